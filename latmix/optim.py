"""Optimizers and learning-rate schedules for calibration (the Hydra group optim/, settings.OptimConfig).

AdamW with a cosine schedule is the default; SGD; and Cayley SGD (SpinQuant), which keeps every
parameter that starts out as an orthogonal matrix on the orthogonal group by a Cayley retraction
and trains the remaining parameters with momentum SGD. A learnable `Rotation` with the default
parametrization (exp) needs none of this: torch's orthogonal parametrization keeps it exactly
orthogonal under any optimizer (its raw parameter starts as -I, which Cayley SGD would also hold on
the orthogonal group, a constraint it does not need). With parametrization stiefel the rotation is
the parameter itself, and Cayley SGD is what keeps it orthogonal (transform=spinquant).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from latmix.settings import OptimConfig

# A parameter counts as orthogonal when ||Q^T Q - I||_max is below this at construction.
ORTHOGONALITY_TOLERANCE = 1e-4
# SpinQuant's guard against a zero skew matrix in its step-size cap 1 / ||W||_1.
CAYLEY_EPSILON = 1e-8


def is_orthogonal_matrix(p: torch.Tensor) -> bool:
    """Square and orthogonal: a rectangular matrix with orthonormal columns is not moved as one (the
    step below rotates within its column space only)."""
    if p.dim() != 2 or p.shape[0] != p.shape[1]:
        return False
    gram = p.detach().double().T @ p.detach().double()
    return bool(
        (gram - torch.eye(p.shape[1], dtype=gram.dtype, device=gram.device)).abs().max()
        < ORTHOGONALITY_TOLERANCE
    )


class CayleySGD(torch.optim.Optimizer):
    """SpinQuant's optimizer (its SGDG): SGD on the orthogonal group by a Cayley retraction.

    For an orthogonal parameter X with descent direction D (the gradient, or with momentum > 0 the
    momentum buffer of gradients), the skew matrix W = (X^T D - D^T X) / 2 moves X to
    X (I - a/2 W)(I + a/2 W)^-1, exactly orthogonal, with step a = min(lr, 1 / ||W||_1): SpinQuant's
    cap, which binds where ||W||_1 > 1 / lr and there makes a step's size independent of the
    gradient's scale (on SmolLM2's clipped gradients it never binds: README, "SpinQuant with its own
    step and loss"). Two deliberate differences from SpinQuant's code: the retraction is solved
    exactly where SpinQuant runs 5 fixed-point iterations of it (and re-orthogonalizes by QR at random
    1 step in 101), and a momentum > 0 is honoured (SpinQuant's rotation training passes none, and
    its buffer is never written back, so its momentum would have no effect either way).
    All other parameters (shifts, scales, clipping ratios) take plain momentum SGD steps with weight
    decay.
    """

    def __init__(
        self, params: list[nn.Parameter] | list[dict], lr: float, momentum: float = 0.9, weight_decay: float = 0.0
    ) -> None:
        groups = []
        # Each group given (e.g. with its own base_lr, latmix.calibrate.trainer.param_groups) splits in two.
        for given in params if params and isinstance(params[0], dict) else [{"params": params}]:
            settings = {key: value for key, value in given.items() if key != "params"}
            tensors = list(given["params"])
            groups += [
                {**settings, "params": [p for p in tensors if is_orthogonal_matrix(p)], "stiefel": True,
                 "weight_decay": 0.0},
                {**settings, "params": [p for p in tensors if not is_orthogonal_matrix(p)], "stiefel": False},
            ]
        super().__init__(
            [g for g in groups if g["params"]], {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                precision = torch.promote_types(p.dtype, torch.float32)  # bfloat16 steps in float32
                grad = p.grad.to(precision)
                if not group["stiefel"] and group["weight_decay"]:
                    grad = grad + group["weight_decay"] * p.to(precision)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(grad))
                buf.mul_(group["momentum"]).add_(grad)
                if group["stiefel"]:
                    p.copy_(self._cayley_step(p.to(precision), buf, group["lr"]).to(p.dtype))
                else:
                    p.add_(buf.to(p.dtype), alpha=-group["lr"])
        return None

    @staticmethod
    def _cayley_step(X: torch.Tensor, direction: torch.Tensor, lr: float) -> torch.Tensor:
        skew = 0.5 * (X.T @ direction - direction.T @ X)
        step = (1.0 / (skew.abs().sum(dim=0).max() + CAYLEY_EPSILON)).clamp(max=lr)  # a tensor: no device sync
        half = 0.5 * step * skew
        eye = torch.eye(X.shape[0], dtype=X.dtype, device=X.device)
        return torch.linalg.solve(eye + half, X @ (eye - half), left=False)


def build_optimizer(params: list[nn.Parameter] | list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of cfg over params, or over parameter groups that may carry a "base_lr" (`set_lr`)."""
    if not params:
        raise ValueError("no trainable parameters to optimize; check the transform config (learnable: true)")
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return CayleySGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The multiplier of cfg.lr at a step: linear warmup, then constant or cosine decay to 0."""
    if step < cfg.warmup:
        return (step + 1) / (cfg.warmup + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup) / max(total_steps - cfg.warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, cfg: OptimConfig) -> None:
    """Set the learning rate for `step` from the step alone, so a resumed run follows the same schedule."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("base_lr", cfg.lr) * lr_factor(step, total_steps, cfg)


def clip_gradients(params: list[nn.Parameter], cfg: OptimConfig) -> float:
    """Clip the global gradient norm to cfg.grad_clip (if set); returns the norm before clipping."""
    max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
