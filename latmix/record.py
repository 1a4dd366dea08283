"""The result record: one JSON file per run, the source of truth for every table.

A run's identity is the hash of its resolved config, so the same experiment always lands in the
same file, a finished run can be recognised and skipped, and a requeued job finds its checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from latmix.files import atomic_write
from latmix.settings import float_keys

SCHEMA_VERSION = 1

# Keys that say where and how a run executes, not what it computes: they stay out of the run id.
NON_IDENTITY_KEYS = ("paths", "logger", "force", "wait", "export", "hydra", "launcher")
# The same for keys inside a group (dotted): how checkpoints are kept.
NON_IDENTITY_SUBKEYS = ("calib.checkpoint_minutes", "calib.keep_checkpoints")
# Settings added after runs were recorded, at the value every earlier run had implicitly: at that value
# they stay out of the run id, so the earlier records keep their ids (and are found, not rerun).
IMPLICIT_BEFORE = {
    "calib.rounding": "nearest", "calib.micro_batch_size": None, "optim.clip_lr": None,
    "calib.layer_inputs": "quantized",
}
# Calibration fields that describe one execution (how long, whether it resumed), not its result: two
# executions of one run agree on everything else in the record's calibration section.
EXECUTION_CALIBRATION_KEYS = ("seconds", "measure_seconds", "resumed_from_step")
PACKAGE_DIR = Path(__file__).resolve().parent
# What decides a run's numbers besides its inputs: the package, its configs and the entry point.
CODE_PATHS = (PACKAGE_DIR, PACKAGE_DIR.parent / "conf", PACKAGE_DIR.parent / "run.py")

# Required top-level fields and their JSON types; nested parts are checked by `validate_record`.
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "run_id": str,
    "created": str,
    "git_sha": (str, type(None)),
    "config": dict,
    "model": str,
    "quant": str,
    "transform": str,
    "weight_quantizer": str,
    "seed": int,
    "metrics": dict,
    "calibration": dict,
    "timing": dict,
    "env": dict,
}


class RecordError(ValueError):
    """A result record that does not follow the schema."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def typed_numbers(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with whole numbers at float settings written as floats: `calib.reg_weight=0` on the
    command line (an int to Hydra) and `reg_weight: 0.0` in a YAML file are one experiment."""
    typed = dict(config)
    for section, keys in float_keys().items():
        values = typed.get(section)
        if isinstance(values, Mapping):
            typed[section] = {k: _as_float(v) if k in keys else v for k, v in values.items()}
    return typed


def _as_float(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def identity(resolved_config: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config, numbers typed (typed_numbers), minus where-and-how keys (NON_IDENTITY_KEYS,
    NON_IDENTITY_SUBKEYS) and minus later settings at their implicit earlier value (IMPLICIT_BEFORE)."""
    kept = {k: v for k, v in typed_numbers(resolved_config).items() if k not in NON_IDENTITY_KEYS}
    implicit = [dotted for dotted, value in IMPLICIT_BEFORE.items() if _dotted_get(kept, dotted) == value]
    for dotted in (*NON_IDENTITY_SUBKEYS, *implicit):
        group, key = dotted.split(".", 1)
        if isinstance(kept.get(group), Mapping) and key in kept[group]:
            kept[group] = {k: v for k, v in kept[group].items() if k != key}
    return kept


def _dotted_get(config: Mapping[str, Any], dotted: str) -> Any:
    group, key = dotted.split(".", 1)
    section = config.get(group)
    return section.get(key) if isinstance(section, Mapping) else None


def run_id(resolved_config: Mapping[str, Any]) -> str:
    """First 12 hex chars of sha256 over the resolved config, minus where-and-how keys."""
    return hashlib.sha256(canonical_json(identity(resolved_config)).encode()).hexdigest()[:12]


# What a run keeps under its id in the results folder. One place spells the layout, so that what moves
# a run (scripts/rekey_records.py) finds every file the run wrote.
EXPORT_MANIFEST = "latmix_quant.json"


def record_path(results_dir: str | Path, rid: str) -> Path:
    return Path(results_dir) / "runs" / f"{rid}.json"


def lock_path(results_dir: str | Path, rid: str) -> Path:
    return Path(results_dir) / "runs" / f"{rid}.lock"


def transforms_path(results_dir: str | Path, rid: str) -> Path:
    """The run's learned maps (latmix.export.save_learned)."""
    return Path(results_dir) / "transforms" / f"{rid}.safetensors"


def export_dir(results_dir: str | Path, rid: str) -> Path:
    """The run's quantized model (export=true; latmix.export.export_model), its manifest EXPORT_MANIFEST."""
    return Path(results_dir) / "export" / rid


def checkpoint_dir(results_dir: str | Path, rid: str) -> Path:
    """The run's calibration checkpoint, while it calibrates or after it was stopped."""
    return Path(results_dir) / "ckpt" / rid


def run_files(results_dir: str | Path, rid: str) -> tuple[Path, Path, Path]:
    """What the results folder keeps under a run's id besides its record and lock."""
    return transforms_path(results_dir, rid), export_dir(results_dir, rid), checkpoint_dir(results_dir, rid)


def git_sha(repo_dir: str | Path | None = None) -> str | None:
    """The commit the code ran at, or None outside a git checkout."""
    out = _git(["rev-parse", "HEAD"], repo_dir or PACKAGE_DIR)
    return (out or "").strip() or None


def uncommitted_code(paths: tuple[Path, ...] = CODE_PATHS) -> list[str] | None:
    """The code files that differ from the commit `git_sha` names (modified, staged, deleted or new),
    as paths in the repository; None outside a git checkout. A run made with any cannot be rerun from
    its commit alone, so its record lists them."""
    # --no-optional-locks: status would otherwise refresh the index under its lock, and a sweep's
    # simultaneous runs (or the user's own `git commit`) would then find index.lock taken.
    status = ["--no-optional-locks", "status", "--porcelain", "-z", "--untracked-files=all"]
    out = _git([*status, "--", *map(str, paths)], paths[0].parent)
    if out is None:
        return None
    entries = iter(out.split("\0"))  # each "XY path"
    changed = []
    for entry in entries:
        if entry:
            changed.append(entry[3:])
            if entry[0] in "RC":
                next(entries, None)  # a rename's or copy's source path follows: not a change of its own
    return sorted(changed)


@dataclass(frozen=True)
class CodeVersion:
    sha: str | None  # git_sha
    uncommitted: list[str] | None  # uncommitted_code


@functools.cache
def running_code() -> CodeVersion:
    """The commit and uncommitted code files of the code this process runs, read once: at the first
    run's start (experiment.run asks first), since the modules stay as they were imported while the
    checkout moves on: a commit or an edit during a long run, or between the runs of a sweep that
    share this process, must not change what their records claim."""
    return CodeVersion(git_sha(), uncommitted_code())


def _git(args: list[str], cwd: str | Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def calibration_learned(rec: Mapping[str, Any]) -> bool:
    """Whether the run's calibration learned: not skipped (calib.mode none, nothing quantized or nothing
    learnable). A record that does not say is taken to have learned."""
    return not (rec.get("calibration") or {}).get("skipped")


def _require_number(value: Any, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise RecordError(f"{where} must be a number or null, got {type(value).__name__}")


def validate_record(rec: Any) -> dict:
    """Return `rec` if it follows the schema, else raise RecordError naming the offending field."""
    if not isinstance(rec, dict):
        raise RecordError(f"a record is a JSON object, got {type(rec).__name__}")
    for name, kind in REQUIRED_FIELDS.items():
        if name not in rec:
            raise RecordError(f"missing field '{name}'")
        if not isinstance(rec[name], kind) or (kind is int and isinstance(rec[name], bool)):
            raise RecordError(f"field '{name}' has type {type(rec[name]).__name__}")
    if rec["schema_version"] != SCHEMA_VERSION:
        raise RecordError(f"schema_version {rec['schema_version']} is not {SCHEMA_VERSION}")
    metrics = rec["metrics"]
    for part in ("ppl", "tasks", "averages"):
        if not isinstance(metrics.get(part), dict):
            raise RecordError(f"metrics.{part} must be an object")
    for name, value in metrics["ppl"].items():
        _require_number(value, f"metrics.ppl.{name}")
    for task, scores in metrics["tasks"].items():
        if not isinstance(scores, dict):
            raise RecordError(f"metrics.tasks.{task} must be an object")
        for key, value in scores.items():
            _require_number(value, f"metrics.tasks.{task}.{key}")
    for name, value in metrics["averages"].items():
        _require_number(value, f"metrics.averages.{name}")
    _validate_task_items(rec.get("eval", {}).get("task_items", {}))
    if not isinstance(rec["calibration"].get("per_layer", []), list):
        raise RecordError("calibration.per_layer must be a list")
    for stage, seconds in rec["timing"].items():
        _require_number(seconds, f"timing.{stage}")
    uncommitted = rec.get("git_uncommitted")  # optional: records before it was kept lack it
    if uncommitted is not None and not (isinstance(uncommitted, list) and all(isinstance(p, str) for p in uncommitted)):
        raise RecordError("git_uncommitted must be a list of paths or null")
    return rec


def _validate_task_items(items: Any) -> None:
    """eval.task_items (optional): task -> {docs: digest, acc / acc_norm: "0"/"1" per item, same length}."""
    if not isinstance(items, dict):
        raise RecordError("eval.task_items must be an object")
    for task, entry in items.items():
        where = f"eval.task_items.{task}"
        if not isinstance(entry, dict) or not isinstance(entry.get("docs"), str):
            raise RecordError(f"{where} must be an object with a 'docs' digest")
        answers = {metric: text for metric, text in entry.items() if metric != "docs"}
        if not answers or any(not isinstance(text, str) or set(text) - {"0", "1"} for text in answers.values()):
            raise RecordError(f"{where}: each metric's answers must be a string of 0s and 1s")
        if len({len(text) for text in answers.values()}) != 1:
            raise RecordError(f"{where}: its metrics answer different numbers of items")


def write_record(path: str | Path, rec: dict) -> Path:
    """Validate, then write atomically (files.atomic_write: a temp file beside it, then os.replace)."""
    validate_record(rec)
    text = json.dumps(rec, indent=2, sort_keys=True, default=str)
    return atomic_write(path, lambda f: f.write(text.encode()))


def read_record(path: str | Path) -> dict:
    """Load and validate one record; RecordError (with the path) if it is unreadable or malformed."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RecordError(f"{path}: not readable JSON ({err})") from err
    try:
        return validate_record(rec)
    except RecordError as err:
        raise RecordError(f"{path}: {err}") from err


@dataclass(frozen=True)
class SkippedRecord:
    path: Path
    reason: str


def iter_records(results_dir: str | Path) -> Iterator[dict | SkippedRecord]:
    """Every record under `<results_dir>/runs/`, or a SkippedRecord saying why one was not usable."""
    for path in sorted((Path(results_dir) / "runs").glob("*.json")):
        try:
            yield read_record(path)
        except RecordError as err:
            yield SkippedRecord(path, str(err))
