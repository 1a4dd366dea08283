"""Optimizers and learning-rate schedules for calibration (the Hydra group optim/, settings.OptimConfig).

AdamW with a cosine schedule is the default; SGD; and Cayley SGD (SpinQuant), which keeps every
parameter that starts out as an orthogonal matrix on the Stiefel manifold by a Cayley retraction
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


def is_orthogonal_matrix(p: torch.Tensor) -> bool:
    if p.dim() != 2 or p.shape[0] < p.shape[1]:
        return False
    gram = p.detach().double().T @ p.detach().double()
    return bool(
        (gram - torch.eye(p.shape[1], dtype=gram.dtype, device=gram.device)).abs().max()
        < ORTHOGONALITY_TOLERANCE
    )


class CayleySGD(torch.optim.Optimizer):
    """SpinQuant's optimizer: momentum SGD on the Stiefel manifold {X : X^T X = I} by a Cayley retraction.

    Parameters that are orthogonal matrices when the optimizer is built stay on the manifold: with
    momentum buffer M of the Euclidean gradient, the skew matrix W = M X^T - X M^T moves X by
    X <- (I + lr/2 W)^-1 (I - lr/2 W) X, exactly orthogonal for any step. All other parameters
    (shifts, scales, clipping ratios) take plain momentum SGD steps with weight decay.
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
                grad = p.grad.float()
                if not group["stiefel"] and group["weight_decay"]:
                    grad = grad + group["weight_decay"] * p.float()
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(grad))
                buf.mul_(group["momentum"]).add_(grad)
                if group["stiefel"]:
                    p.copy_(self._cayley_step(p.float(), buf, group["lr"]).to(p.dtype))
                else:
                    p.add_(buf.to(p.dtype), alpha=-group["lr"])
        return None

    @staticmethod
    def _cayley_step(X: torch.Tensor, direction: torch.Tensor, lr: float) -> torch.Tensor:
        half = 0.5 * lr * (direction @ X.T - X @ direction.T)
        eye = torch.eye(X.shape[0], dtype=X.dtype, device=X.device)
        return torch.linalg.solve(eye + half, (eye - half) @ X)


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
