"""Calibration checkpoints: one file per run directory, written atomically, refused if another calibration wrote it.

A checkpoint holds plain tensors, ints, floats, strings and lists only (it is loaded with
weights_only=True) and carries a fingerprint of the configs, the trainable parameter names and the
calibration ids, so a different calibration never resumes from it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latmix.files import atomic_write
from latmix.settings import CalibConfig, OptimConfig

__all__ = [
    "CHECKPOINT_FILE",
    "CheckpointMismatch",
    "Checkpoints",
    "fingerprint",
    "load_params",
    "param_state",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_FILE = "calibration.pt"


class CheckpointMismatch(ValueError):
    """The checkpoint in ckpt_dir was written by a different calibration."""


def fingerprint(cfg: CalibConfig, optim_cfg: OptimConfig, calib_ids: torch.Tensor, names: list[str]) -> str:
    ids = calib_ids.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()
    text = repr((asdict(cfg), asdict(optim_cfg), sorted(names)))
    return hashlib.sha256(text.encode() + hashlib.sha256(ids).digest()).hexdigest()


class Checkpoints:
    """The checkpoint file of one calibration in `directory` (None: no checkpoints)."""

    def __init__(self, directory: Path | None, fingerprint: str) -> None:
        self.directory = directory
        self.fingerprint = fingerprint

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def save(self, state: dict[str, Any]) -> None:
        """Write atomically: a preempted write leaves the previous checkpoint intact."""
        state = {"fingerprint": self.fingerprint, **state}
        atomic_write(self.directory / CHECKPOINT_FILE, lambda f: torch.save(state, f))

    def load(self) -> dict[str, Any] | None:
        """The latest state, or None; CheckpointMismatch if another calibration wrote it."""
        if self.directory is None or not (self.directory / CHECKPOINT_FILE).is_file():
            return None
        state = torch.load(self.directory / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointMismatch(
                f"the checkpoint in {self.directory} was written by a different calibration (config, data or "
                "model); delete it or point ckpt_dir elsewhere"
            )
        return state


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
