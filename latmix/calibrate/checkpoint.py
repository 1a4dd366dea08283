"""Calibration checkpoints: one file per run directory, written atomically, resumed only by the same calibration.

A checkpoint holds plain tensors, ints, floats, strings and lists only (it is loaded with
weights_only=True) and carries a fingerprint in four parts:

    settings  the calibration and optimizer settings (minus how checkpoints are kept) and the
              trainable parameter names
    data      the calibration token ids
    model     the model's weights (models.loading.weights_fingerprint: manifest sha256, size, mtime,
              first and last MiB of every weight file)
    code      the latmix sources (version.code_version)

A checkpoint whose fingerprint differs is not resumed: calibration starts over (a warning names
what differs) and the first new checkpoint replaces it. One that cannot be read is a
`CheckpointCorrupt` ConfigError naming the file and how to discard it (`read_checkpoint`, which the
run also calls before any work).

When: `Checkpoints.after_step` (end to end) saves when the step-based schedule says so
(calib.checkpoint_every, which also paces the conditioning guard), when calib.checkpoint_minutes
have passed since the last save, and when a signal is pending (latmix.interrupt), then acts on that
signal; layer-wise calibration saves after every block.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latmix import interrupt
from latmix.errors import ConfigError
from latmix.files import atomic_write
from latmix.models.loading import weights_fingerprint
from latmix.settings import CalibConfig, OptimConfig
from latmix.version import code_version

__all__ = [
    "CHECKPOINT_FILE",
    "EXECUTION_FIELDS",
    "CheckpointCorrupt",
    "CheckpointMismatch",
    "Checkpoints",
    "discard",
    "fingerprint",
    "load_params",
    "param_state",
    "read_checkpoint",
    "rng_state",
    "set_rng_state",
]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "calibration.pt"
# CalibConfig fields that say how checkpoints are kept, not what is learned: outside the fingerprint.
EXECUTION_FIELDS = ("checkpoint_minutes", "keep_checkpoints")
FINGERPRINT_PARTS = {
    "settings": "other calibration settings",
    "data": "other calibration data",
    "model": "other model weights",
    "code": "other latmix code",
}


class CheckpointMismatch(ValueError):
    """The checkpoint in ckpt_dir was written by a different calibration (kept for callers that catch it)."""


class CheckpointCorrupt(ConfigError):
    """A checkpoint file that cannot be read back."""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(
    cfg: CalibConfig,
    optim_cfg: OptimConfig,
    calib_ids: torch.Tensor,
    names: list[str],
    model: nn.Module | None = None,
) -> dict[str, str]:
    """What a checkpoint must match to be resumed: settings, data, model weights, code (see the module doc)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in EXECUTION_FIELDS}
    ids = calib_ids.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()
    return {
        "settings": _sha(repr((settings, asdict(optim_cfg), sorted(names))).encode()),
        "data": _sha(ids),
        "model": weights_fingerprint(getattr(model, "name_or_path", None)) if model is not None else "none",
        "code": code_version(),
    }


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's state; CheckpointCorrupt (one line: the file, and how to start over) if unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = " ".join(str(err).split())[:120] or type(err).__name__
        raise CheckpointCorrupt(
            f"calibration checkpoint {path} is corrupt ({type(err).__name__}: {reason}); discard it and start "
            f"over: rerun with force=true, or delete {path.parent}"
        ) from err
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise CheckpointCorrupt(
            f"calibration checkpoint {path} is not a latmix checkpoint; discard it and start over: rerun with "
            f"force=true, or delete {path.parent}"
        )
    return state


def discard(directory: Path) -> None:
    """Remove a run's checkpoint directory (and the ckpt/ folder above it once empty)."""
    shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(OSError):  # other runs' checkpoints are there, or it is gone
        directory.parent.rmdir()


class Checkpoints:
    """The checkpoint file of one calibration in `directory` (None: no checkpoints)."""

    def __init__(
        self, directory: Path | None, fingerprint: dict[str, str] | str, *, every_minutes: float | None = None
    ) -> None:
        self.directory = directory
        self.fingerprint = fingerprint
        self.every_minutes = every_minutes
        self._last_save = time.monotonic()

    @classmethod
    def for_calibration(
        cls,
        directory: Path | str | None,
        cfg: CalibConfig,
        optim_cfg: OptimConfig,
        calib_ids: torch.Tensor,
        names: list[str],
        model: nn.Module | None = None,
    ) -> Checkpoints:
        """The checkpoints of one calibration call: fingerprinted, saved every calib.checkpoint_minutes too."""
        return cls(
            None if directory is None else Path(directory),
            fingerprint(cfg, optim_cfg, calib_ids, names, model),
            every_minutes=getattr(cfg, "checkpoint_minutes", None),
        )

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    @property
    def path(self) -> Path | None:
        return None if self.directory is None else self.directory / CHECKPOINT_FILE

    def save(self, state: dict[str, Any]) -> None:
        """Write atomically: a preempted write leaves the previous checkpoint intact."""
        state = {"fingerprint": self.fingerprint, **state}
        atomic_write(self.path, lambda f: torch.save(state, f))
        self._last_save = time.monotonic()
        interrupt.note_checkpoint(self.path)

    def _differences(self, found: Any) -> str:
        if not isinstance(found, dict) or not isinstance(self.fingerprint, dict):
            return "an older latmix"
        parts = []
        for key, mine in self.fingerprint.items():
            if found.get(key) != mine:
                what = FINGERPRINT_PARTS.get(key, key)
                parts.append(f"{what} (version {found.get(key)}, now {mine})" if key == "code" else what)
        return ", ".join(parts) or "another calibration"

    def load(self) -> dict[str, Any] | None:
        """The latest state to resume from, or None (no checkpoint, or one another calibration wrote)."""
        if self.path is None or not self.path.is_file():
            return None
        state = read_checkpoint(self.path)
        if state.get("fingerprint") != self.fingerprint:
            log.warning("calibration checkpoint %s was written with %s: not resumed, calibration starts over",
                        self.path, self._differences(state.get("fingerprint")))
            return None
        where = f"step {state['step']}" if "step" in state else f"block {state.get('block')}"
        log.info("calibration resumes from %s (checkpoint %s)", where, self.path)
        interrupt.note_checkpoint(self.path)
        return state

    def after_step(self, done: int, total: int, due: bool, state: Callable[[], dict[str, Any]]) -> None:
        """End of an optimizer step: save if `due` (the step schedule), if calib.checkpoint_minutes have
        passed, or if a signal is pending; then act on that signal (latmix.interrupt.check)."""
        stopping = interrupt.pending() is not None
        timed = self.every_minutes is not None and time.monotonic() - self._last_save >= 60 * self.every_minutes
        if self.enabled and (due or timed or stopping):
            self.save(state())
        interrupt.check(f"calibration step {done} of {total}")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def param_state(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in params.items()}


@torch.no_grad()
def load_params(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    for name, p in params.items():
        p.copy_(state[name].to(p.device))
