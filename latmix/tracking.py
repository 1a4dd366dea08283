"""Weights & Biases tracking: online, offline or disabled, never at the cost of a run.

The result record on disk is the source of truth. Every call into wandb goes through `_guarded`, so
a tracker failure (no network, a full disk, a server error) becomes a warning and the run goes on.
Runs are grouped by sweep and tagged with model, quant and transform, so ablations line up in the UI.
"""

from __future__ import annotations

import functools
import logging
import netrc
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

WANDB_HOST = "api.wandb.ai"
# Per-layer series of the calibration report drawn as curves over depth.
PER_LAYER_CURVES = {
    "loss_per_layer": ("loss_before", "loss_after"),
    "bound_vs_error": ("bound_before", "error_before", "bound_after", "error_after"),
}
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


class Tracker:
    """One W&B run per experiment; every method is a no-op when disabled or after a failure."""

    def __init__(self, mode: str, project: str, entity: str | None, wandb_dir: str | Path) -> None:
        self.mode = resolve_mode(mode)
        self.project = project
        self.entity = entity
        self.wandb_dir = Path(wandb_dir)
        self.run: Any = None

    @_guarded
    def start(self, name: str, config: Mapping[str, Any], group: str | None, tags: Iterable[str]) -> None:
        if self.mode == "disabled":
            return
        import wandb

        self.wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            name=name,
            group=group,
            tags=sorted(set(tags)),
            config=flatten(config),
            mode=self.mode,
            dir=str(self.wandb_dir),
            settings=wandb.Settings(console="off", silent=True),
        )

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
    def finish(self) -> None:
        self.run.finish()
        self.run = None


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None
