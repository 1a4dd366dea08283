"""Weights & Biases tracking: online, offline or disabled, never at the cost of a run.

The result record on disk is the source of truth. Every call into wandb goes through `_guarded`, so
a tracker failure (no network, a full disk, a server error) becomes a warning and the run goes on.

Made for ablations (`run_identity`):
- group: the configuration (the resolved config minus the seed, names and where/how keys, as the
  tables define it: `tables.configuration_id`), so the seeds of one configuration group together
  across sweeps; `logger.group` overrides it;
- job_type: the method, transform + weight quantizer ("affine+gptq"; "identity" for full precision);
- name: model-quant-method, the hyperparameters set on the command line (Hydra's task overrides,
  `optim.lr=0.01`, a sweep's values) except group choices and where/how keys, the seed, and the first
  6 hex of the configuration id, so two settings never share a name;
- tags: model, quant, transform, weight quantizer, method, each changed hyperparameter, the sweep.

A Tracker is a context manager: a run that raises (any exception, a ConfigError found after the
tracker started, KeyboardInterrupt, the `Interrupted` of a signal) is finished with a non-zero exit
code, so W&B shows it failed, with the error in the summary (`error`, `status`); a Slurm preemption
(SIGUSR1/SIGTERM in a Slurm job) is first marked preempting. An offline run says where it went and
the `wandb sync` command that uploads it.
"""

from __future__ import annotations

import functools
import logging
import netrc
import os
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from latmix.settings import Experiment

log = logging.getLogger(__name__)

WANDB_HOST = "api.wandb.ai"
# What a run's summary says of its calibration, beside `learned` (a W&B column to filter runs by: the
# config's calib.mode alone does not say, since a run with nothing to learn keeps the default mode).
CALIBRATION_SUMMARY = ("steps", "seconds", "loss_before", "loss_after", "skipped")
# Per-layer series of the calibration report drawn as curves over depth.
PER_LAYER_CURVES = {
    "loss_per_layer": ("loss_before", "loss_after"),
    "bound_vs_error": ("bound_before", "error_before", "bound_after", "error_after"),
}
# Top-level config keys a name never shows: shown otherwise (seed), or not what a run computes.
# Keys the labels already state (the method names the weight quantizer).
LABELLED_KEYS = ("quant.weight_quantizer",)
UNNAMED_KEYS = ("seed", "device", "force", "export", "paths", "logger", "hydra", "launcher", "experiment")
MAX_TAG = 64
PREEMPTION_SIGNALS = ("SIGUSR1", "SIGTERM")
T = TypeVar("T")


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """'auto' -> online with credentials, offline without; other modes pass through."""
    if mode == "auto":
        return "online" if has_wandb_credentials() else "offline"
    return mode


def flatten(tree: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """{'quant': {'block_size': 32}} -> {'quant.block_size': 32}, so every key is a W&B column."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, sep, f"{name}{sep}"))
        else:
            flat[name] = value
    return flat


# --- what a run is called ------------------------------------------------------------------------


@dataclass(frozen=True)
class RunIdentity:
    name: str
    group: str
    job_type: str
    tags: list[str]
    config: dict[str, Any] = field(default_factory=dict)


def changed_settings(overrides: Iterable[str], group_names: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(key, value) of the command-line overrides that set a hyperparameter (`optim.lr=0.01`).

    Group choices (`transform=affine`, `hydra/launcher=slurm`, `+experiment=x`) are left out (the
    preset names say them), and so are the seed and the keys that say where or how a run executes.
    A value that is a path shows its last part.
    """
    from latmix.tables import EXECUTION_KEYS

    groups = set(group_names)
    changed = []
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        if (not sep or "/" in key or key in groups or key.split(".")[0] in UNNAMED_KEYS or key in EXECUTION_KEYS
                or key in LABELLED_KEYS):
            continue
        if "/" in value and not value.startswith("["):
            value = Path(value).name
        changed.append((key.removeprefix("transform.placements."), value))
    return changed


def hydra_overrides() -> tuple[list[str], list[str]]:
    """(Hydra's task overrides of this job, the names of the config groups) or ([], []) outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return [], []
    hydra_cfg = HydraConfig.get()
    return list(hydra_cfg.overrides.task), list(hydra_cfg.runtime.choices)


def sweep_name() -> str | None:
    """'sweep-<date>_<time>' for a job of a -m sweep (its sweep directory), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(HydraConfig.get().sweep.dir)
    return f"sweep-{sweep_dir.parent.name}_{sweep_dir.name}"


def run_identity(
    resolved: Mapping[str, Any], *, run_id: str, model: str, quant: str, transform: str, weight_quantizer: str,
    seed: int, overrides: Sequence[str] = (), group_names: Sequence[str] = (), group: str | None = None,
    extra_tags: Sequence[str] = (), sweep: str | None = None,
) -> RunIdentity:
    """Name, group, job type and tags of one run (see the module doc)."""
    from latmix import tables

    pseudo_record = {"config": dict(resolved), "seed": seed, "transform": transform}
    quantized = dict(resolved.get("quant") or {}).get("weight_format") is not None
    method = tables.method_label(transform, weight_quantizer, quantized)
    config_id = tables.configuration_id(model, quant, method, tables.configuration(pseudo_record))
    changed = [f"{key}={value}" for key, value in changed_settings(overrides, group_names)]
    name = "-".join([model, quant, method, *changed, f"s{seed}", config_id[:6]])
    tags = [model, quant, transform, method, *([weight_quantizer] if quantized else []), *changed,
            *([sweep] if sweep else []), *extra_tags]
    return RunIdentity(
        name=name,
        group=group or f"{model}-{quant}-{method}-{config_id}",
        job_type=method,
        tags=sorted({tag[:MAX_TAG] for tag in tags}),
        config={"run_id": run_id, "configuration_id": config_id, "method": method, "overrides": list(overrides),
                **resolved},
    )


# --- the tracker ---------------------------------------------------------------------------------


def _guarded(method: Callable[..., T]) -> Callable[..., T | None]:
    """Run a tracker method; on any exception warn once and disable the tracker."""

    @functools.wraps(method)
    def wrapper(self: Tracker, *args: Any, **kwargs: Any) -> T | None:
        if self.run is None and method.__name__ != "start":
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # a tracker must never take a run down with it
            log.warning("W&B %s failed (%s: %s); continuing, the record on disk is complete",
                        method.__name__, type(err).__name__, err)
            self.run = None
            return None

    return wrapper


def signal_name(error: BaseException) -> str | None:
    """The signal an `Interrupted` (or KeyboardInterrupt: SIGINT) stands for, as 'SIGTERM'."""
    if isinstance(error, KeyboardInterrupt):
        return "SIGINT"
    if type(error).__name__ != "Interrupted":
        return None
    for attribute in ("signal_name", "signal", "signame", "signum"):
        value = getattr(error, attribute, None)
        if isinstance(value, int):
            try:
                return signal.Signals(value).name
            except ValueError:
                return str(value)
        if value:
            return str(value)
    return "signal"


def exit_code_of(error: BaseException) -> int:
    """128 + signal number for a signal (as a shell reports it), else 1."""
    if isinstance(getattr(error, "exit_status", None), int):
        return error.exit_status
    name = signal_name(error)
    if name is not None and hasattr(signal, name):
        return 128 + int(getattr(signal, name))
    return 1


def is_preemption(error: BaseException) -> bool:
    """A Slurm job signalled to stop (time limit or preemption) with requeue ahead."""
    return "SLURM_JOB_ID" in os.environ and signal_name(error) in PREEMPTION_SIGNALS


class Tracker:
    """One W&B run per experiment; every method is a no-op when disabled or after a failure.

    Use it as a context manager around the run: the W&B run is finished on the way out, failed (with
    the error) if the block raised.
    """

    def __init__(self, mode: str, project: str, entity: str | None, wandb_dir: str | Path) -> None:
        self.mode = resolve_mode(mode)
        self.project = project
        self.entity = entity
        self.wandb_dir = Path(wandb_dir)
        self.run: Any = None
        self.run_dir: Path | None = None

    @_guarded
    def start(
        self, name: str, config: Mapping[str, Any], group: str | None, tags: Iterable[str], job_type: str | None = None
    ) -> None:
        if self.mode == "disabled":
            return
        import wandb

        self.wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            name=name,
            group=group,
            job_type=job_type,
            tags=sorted(set(tags)),
            config=flatten(config),
            mode=self.mode,
            dir=str(self.wandb_dir),
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run_dir = Path(self.run.dir).parent  # <wandb_dir>/wandb/<offline-run-...>/ (files/ inside)

    def start_identity(self, identity: RunIdentity) -> Tracker:
        self.start(identity.name, identity.config, identity.group, identity.tags, identity.job_type)
        return self

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, error: BaseException | None, traceback: Any) -> bool:
        if error is None:
            self.finish()
        else:
            self.fail(error)
        return False

    @_guarded
    def log_step(self, progress: Mapping[str, Any]) -> None:
        """One calibration step (end to end) or block (layer-wise): the live loss curve."""
        self.run.log({f"calibration/{k}": v for k, v in progress.items() if _is_scalar(v)})

    @_guarded
    def log_calibration(self, per_layer: list[Mapping[str, Any]]) -> None:
        """The per-layer table (losses, bound vs measured error, conditioning) and its curves over depth."""
        import wandb

        if not per_layer:
            return
        columns = sorted({key for row in per_layer for key in row if _is_scalar(row[key])})
        table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in per_layer])
        plots = {}
        for title, keys in PER_LAYER_CURVES.items():
            keys = [k for k in keys if any(isinstance(row.get(k), (int, float)) for row in per_layer)]
            if keys:
                plots[f"calibration/{title}"] = wandb.plot.line_series(
                    xs=list(range(len(per_layer))),
                    ys=[[_number(row.get(k)) for row in per_layer] for k in keys],
                    keys=keys, title=title, xname="quantization point",
                )
        self.run.log({"calibration/per_layer": table, **plots})

    @_guarded
    def log_summary(self, values: Mapping[str, Any]) -> None:
        self.run.summary.update(flatten(values, sep="/"))

    @_guarded
    def log_figures(self, figures: Mapping[str, Path]) -> None:
        import wandb

        self.run.log({f"figures/{name}": wandb.Image(str(path)) for name, path in figures.items()})

    @_guarded
    def log_artifact(
        self, name: str, kind: str, files: Mapping[str, str | Path] = (), texts: Mapping[str, str] = (),
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """One artifact of `files` (name in the artifact -> local path) and `texts` (name -> content)."""
        import wandb

        artifact = wandb.Artifact(name, type=kind, metadata=dict(metadata or {}))
        for target, path in dict(files).items():
            artifact.add_file(str(path), name=target)
        for target, text in dict(texts).items():
            with artifact.new_file(target, mode="w") as handle:
                handle.write(text)
        self.run.log_artifact(artifact)

    def log_record(self, rec: Mapping[str, Any], record_path: Path, config_yaml: str) -> None:
        """The record's metrics, timing, fidelity, what calibration did (learned or not, steps, loss
        before and after) and where it ran (`env`: processor, threads, torch; runs of one group may
        differ there, latmix.environment) as the summary, its per-layer table, and the record and
        resolved config as the `record-<run_id>` artifact."""
        from latmix.record import calibration_learned

        calibration = rec["calibration"]
        done = {key: calibration[key] for key in CALIBRATION_SUMMARY if calibration.get(key) is not None}
        self.log_summary({"metrics": rec["metrics"], "timing": rec["timing"], "fidelity": rec.get("fidelity", {}),
                          "calibration": {"learned": calibration_learned(rec), **done}, "env": rec.get("env", {})})
        self.log_calibration(calibration.get("per_layer", []))
        self.log_artifact(f"record-{rec['run_id']}", "result", files={"record.json": record_path},
                          texts={"config.yaml": config_yaml}, metadata={"run_id": rec["run_id"]})

    def log_transforms(self, run_id: str, path: Path | None) -> None:
        """The learned transforms' safetensors as the `transforms-<run_id>` artifact (None: nothing learned)."""
        if path is not None:
            self.log_artifact(f"transforms-{run_id}", "transforms", files={"transforms.safetensors": path},
                              metadata={"run_id": run_id})

    @_guarded
    def fail(self, error: BaseException) -> None:
        """Finish the run as failed: the error in the summary, a non-zero exit code (W&B: failed)."""
        reason = signal_name(error)
        status = "preempted" if is_preemption(error) else ("interrupted" if reason else "failed")
        message = f"{type(error).__name__}: {error}".strip().rstrip(":")
        checkpoint = getattr(error, "checkpoint", None) or getattr(error, "checkpoint_path", None)
        self.run.summary.update({
            "status": status, "error": message[:2000], "error_type": type(error).__name__,
            **({"signal": reason} if reason else {}), **({"checkpoint": str(checkpoint)} if checkpoint else {}),
        })
        if status == "preempted" and hasattr(self.run, "mark_preempting"):
            self.run.mark_preempting()
        self._finish(exit_code_of(error))
        log.warning("W&B run marked %s (%s)", status, message[:200])

    @_guarded
    def finish(self) -> None:
        self._finish(0)

    def _finish(self, exit_code: int) -> None:
        run, self.run = self.run, None
        run.finish(exit_code=exit_code)
        if self.mode == "offline" and self.run_dir is not None:
            log.info("W&B offline run saved in %s; upload it with: wandb sync %s", self.run_dir, self.run_dir)


def start_run(exp: Experiment, run_id: str, resolved: Mapping[str, Any]) -> Tracker:
    """The experiment's started Tracker (a no-op one when disabled or when W&B fails), named for
    ablations (run_identity) from its settings and the job's Hydra overrides; a context manager."""
    overrides, group_names = hydra_overrides()
    identity = run_identity(
        resolved, run_id=run_id, model=exp.model.name, quant=exp.quant_name, transform=exp.transform_name,
        weight_quantizer=exp.quant.weight_quantizer, seed=exp.seed, overrides=overrides, group_names=group_names,
        group=exp.logger.group, extra_tags=exp.logger.tags, sweep=sweep_name(),
    )
    settings = exp.logger
    return Tracker(settings.mode, settings.project, settings.entity, exp.results_dir / "wandb").start_identity(identity)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None
