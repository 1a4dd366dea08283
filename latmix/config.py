"""Hydra config -> `settings.Experiment`: every group built one way, checked before anything heavy loads.

Each yaml group is the settings dataclass of its stage, field for field (model -> ModelSettings,
quant -> QuantConfig, transform -> TransformConfig, calib -> CalibConfig, optim -> OptimConfig,
gptq -> GPTQSettings, eval -> EvalSettings, logger -> LoggerSettings), built by `settings.from_values`, which names the key
of any unknown or rejected value in a ConfigError. Three translations happen on the way: `name` keys
(quant, transform) are labels for records and tables only; a transform's `kv_placements` join its
placements only when the KV cache is quantized; a model path that exists locally is made absolute.
A run's id hashes `identity_config`: the resolved config with its local files spelled one way
(relative to the project root when inside it), however the command line spelled them.

Checked here too, before anything is imported: unknown top-level keys (`+foo=1`), seeds outside
0..2^32-1, a model.name_or_path that can only be a path and does not exist (`resolve_local_path`),
a local model directory's files (latmix.modelfiles: config.json, model_type, custom code, safetensors
headers, calib.seq_len within its positions), calib.path (made absolute; it must exist).

Torch-free: run.py calls build_experiment before it imports the pipeline. What needs the model (its
dimensions against the block sizes) is checked when the model's config is read
(`QuantConfig.check_dimensions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from latmix.errors import ConfigError
from latmix.modelfiles import check_model_directory
from latmix.settings import PPL_DATASETS, SECTION_SETTINGS, SEED_MAX, Experiment, from_values

__all__ = ["ConfigError", "build_experiment", "compose_experiment", "identity_config", "resolve_local_path"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRIMARY_CONFIG = PROJECT_ROOT / "conf" / "config.yaml"


def _section(cfg: DictConfig, key: str) -> dict[str, Any]:
    if key not in cfg or not isinstance(cfg[key], DictConfig):
        raise ConfigError(f"the config has no '{key}' group; pick one with {key}=<option>")
    return dict(OmegaConf.to_container(cfg[key], resolve=True))


def resolve_local_path(name_or_path: str) -> str:
    """A path that exists (from the working directory, then the project root), else the hub id as given.

    What can only be a path (absolute, ./ ../ ~, a backslash, more than one /, or under a directory
    that exists here, like models/x) and does not exist is a ConfigError: a missing path, never a
    hub id to fetch.
    """
    if (found := _found(name_or_path)) is not None:
        return str(found)
    if _looks_like_a_path(name_or_path):
        raise ConfigError(
            f"model.name_or_path={name_or_path}: no such directory (a relative path is looked up from the "
            f"working directory {Path.cwd()}, then {PROJECT_ROOT}); point it at the model's directory"
        )
    return name_or_path


def _found(path: str, file: bool = False) -> Path | None:
    """The absolute path of `path` where it exists (a file, with file=True), looked up from the working
    directory, then the project root; None where it does not."""
    for base in (Path.cwd(), PROJECT_ROOT):
        candidate = (base / path).expanduser()
        if candidate.is_file() if file else candidate.exists():
            return candidate.resolve()
    return None


def _looks_like_a_path(name: str) -> bool:
    """Whether `name` cannot be a hub id (`name` or `org/name`)."""
    if name.startswith(("/", "./", "../", "~", ".")) or "\\" in name or name.count("/") > 1 or name.endswith("/"):
        return True
    head = name.split("/")[0]
    return "/" in name and any((base / head).is_dir() for base in (Path.cwd(), PROJECT_ROOT))


def known_top_level_keys() -> set[str]:
    """The keys of the primary config conf/config.yaml and its config groups, and `hydra`."""
    keys = {"hydra"}
    try:
        primary = OmegaConf.to_container(OmegaConf.load(PRIMARY_CONFIG), resolve=False)
    except (OSError, ValueError):
        return set()
    for entry in primary.pop("defaults", None) or []:
        if isinstance(entry, dict):
            for group in entry:
                keys.add(str(group).removeprefix("override ").split("/")[0].split("@")[0])
    keys.update(str(k) for k in primary)
    return keys


def check_top_level_keys(cfg: DictConfig) -> None:
    """ConfigError for a top-level key no config group or setting defines (`+foo=1`): it would silently
    give the run a new id while changing nothing."""
    known = known_top_level_keys()
    unknown = sorted(str(k) for k in cfg if known and str(k) not in known)
    if unknown:
        raise ConfigError(
            f"unknown top-level key(s) {', '.join(unknown)}: nothing reads them (they would only change the "
            f"run id); remove them, or use one of {', '.join(sorted(known - {'hydra'}))}"
        )


def _int_setting(cfg: DictConfig, key: str, default: int) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{key}={value!r} is not a seed; use an integer from 0 to {SEED_MAX}")
    return value


def resolve_calibration_text(path: Any) -> str | None:
    """calib.path as an absolute path to an existing file (from the working directory, then the project root)."""
    if path is None:
        return None
    if (found := _found(str(path), file=True)) is not None:
        return str(found)
    raise ConfigError(f"calib.path={path}: no such file; set calib.path to a text file (with calib.source=local)")


def identity_config(cfg: DictConfig) -> dict[str, Any]:
    """The composed config resolved to plain values, with every local file it names (model.name_or_path,
    calib.path, eval.ppl_datasets) spelled one way: relative to the project root when inside it, else
    absolute. A run's id and record come from this, so `calib.path=results/x.txt`, `./results/x.txt` and
    its absolute path are one run, and a run's id is the same in every clone of the project."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    model, calib, evaluation = (resolved.get(key) for key in ("model", "calib", "eval"))
    if isinstance(model, dict) and isinstance(model.get("name_or_path"), str):
        model["name_or_path"] = _canonical_path(model["name_or_path"])
    if isinstance(calib, dict) and isinstance(calib.get("path"), str):
        calib["path"] = _canonical_path(calib["path"])
    if isinstance(evaluation, dict) and isinstance(evaluation.get("ppl_datasets"), list):
        evaluation["ppl_datasets"] = [
            d if not isinstance(d, str) or d in PPL_DATASETS else _canonical_path(d) for d in evaluation["ppl_datasets"]
        ]
    return resolved


def _canonical_path(path: str) -> str:
    """A path that exists (from the working directory, then the project root) relative to the project
    root when inside it, else absolute; anything else (a hub id, a missing file) as given."""
    found = _found(path)
    if found is None:
        return path
    return str(found.relative_to(PROJECT_ROOT)) if found.is_relative_to(PROJECT_ROOT) else str(found)


def _transform_values(values: dict[str, Any], kv_quantized: bool) -> dict[str, Any]:
    """transform/<name>.yaml without its label; kv_placements join the placements only when the KV
    cache is quantized (QuaRot/SpinQuant rotate q/k after RoPE only then)."""
    kv_placements = values.pop("kv_placements", None) or {}
    placements = dict(values.pop("placements", None) or {})
    if kv_quantized:
        placements.update(kv_placements)
    return {"placements": placements, **values}


def _eval_values(values: dict[str, Any]) -> dict[str, Any]:
    """eval/ with a perplexity text file looked up from the working directory, then the project root."""
    datasets = values.get("ppl_datasets") or ()
    values["ppl_datasets"] = [d if d in PPL_DATASETS else _local_file(str(d)) for d in datasets]
    return values


def _local_file(path: str) -> str:
    """The absolute path of a file that exists (from the working directory, then the project root), else as given."""
    found = _found(path, file=True)
    return path if found is None else str(found)


def compose_experiment(overrides: Sequence[str]) -> Experiment:
    """The experiment run.py would build from these overrides, for scripts that drive the pipeline
    themselves (benchmarks, probes): composed from the project's conf/ without Hydra's app."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(PRIMARY_CONFIG.parent), version_base="1.3"):
        return build_experiment(compose(PRIMARY_CONFIG.stem, overrides=list(overrides)))


def build_experiment(cfg: DictConfig) -> Experiment:
    """Turn a composed Hydra config into typed settings; ConfigError on the first bad value."""
    check_top_level_keys(cfg)
    seed = _int_setting(cfg, "seed", 0)
    values = {section: _section(cfg, section) for section in SECTION_SETTINGS}
    quant_name, transform_name = (str(values[s].pop("name", "custom")) for s in ("quant", "transform"))
    built: dict[str, Any] = {}
    for section, cls in SECTION_SETTINGS.items():  # quant before transform, whose placements read it
        built[section] = from_values(cls, _translated(section, values[section], built), section)
    exp = Experiment(
        **built,
        quant_name=quant_name,
        transform_name=transform_name,
        seed=seed,
        device=str(cfg.get("device", "auto")),
        force=bool(cfg.get("force", False)),
        results_dir=Path(str(cfg.paths.results_dir)).expanduser().resolve(),
        wait=bool(cfg.get("wait", False)),
        export=bool(cfg.get("export", False)),
    )
    if exp.model.name_or_path is not None and Path(exp.model.name_or_path).is_dir():
        # config.json, architecture, custom code, safetensors headers, positions: milliseconds, no torch
        check_model_directory(Path(exp.model.name_or_path), exp.model.trust_remote_code, exp.calib.seq_len)
    return exp


def _translated(section: str, values: dict[str, Any], built: dict[str, Any]) -> dict[str, Any]:
    """A section's yaml values as its settings class takes them (the translations in the module docstring)."""
    if section == "model" and values.get("name_or_path") is not None:
        values["name_or_path"] = resolve_local_path(str(values["name_or_path"]))
    if section == "transform":
        return _transform_values(values, built["quant"].kv_format is not None)
    if section == "calib":
        return _calib_values(values)
    if section == "eval":
        return _eval_values(values)
    return values


def _calib_values(values: dict[str, Any]) -> dict[str, Any]:
    """calib/ with its text file (calib.path) resolved and checked to exist."""
    if values.get("path") is not None:
        values["path"] = resolve_calibration_text(values["path"])
    return values
