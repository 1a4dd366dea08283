"""The trainable parameters of a calibration and the optimizer steps on them, shared by both modes.

Parameters are grouped by owner: a transform's name ("layers.3.attn_vo") or, with learned clipping,
a quantized linear's module name. `Trainer` runs the steps (schedule, gradient clipping, the
non-finite loss guard), rolls back a map whose conditioning exploded, and saves and restores its
state for checkpoints. The data order of a step depends only on (seed, epoch), so a resumed run
sees the same batches.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from latmix.calibrate.checkpoint import load_params, param_state
from latmix.calibrate.measure import NonFiniteError, Point, describe_parameters
from latmix.optim import build_optimizer, clip_gradients, set_lr
from latmix.quantize import PreparedModel
from latmix.settings import CalibConfig, OptimConfig
from latmix.transforms import Transform, cached_transforms

__all__ = [
    "Groups",
    "Trainer",
    "autocast",
    "batch_indices",
    "batches_per_epoch",
    "clipping_summary",
    "flat",
    "install_clipping",
    "matrices_built_once",
    "micro_losses",
    "param_groups",
    "total_steps",
    "trainable",
]

# owner -> {parameter name: parameter}
Groups = dict[str, dict[str, nn.Parameter]]

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# FlatQuant initializes its clipping logits at 4: sigmoid(4) = 0.982 of the block max.
CLIP_INIT_LOGIT = 4.0


def install_clipping(points: list[Point], *, rtn_weights: bool) -> None:
    """FlatQuant's LWC/LAC: per-output-channel weight and per-layer activation clip ratios, sigmoid-bounded.

    A weight ratio only where the weight is quantized while learning (weight_quantizer=rtn, or
    rtn_weights: calib.quantize_weights): elsewhere nothing would move it from its start, and GPTQ,
    which rounds with it, would clip by a ratio nobody learned."""
    for _, _, linear in points:
        weight_learned = linear.quantize_weights or rtn_weights
        if linear.weight_format is not None and weight_learned and linear.weight_clip is None:
            linear.weight_clip = nn.Parameter(torch.full((linear.out_features, 1, 1), CLIP_INIT_LOGIT))
            parametrize.register_parametrization(linear, "weight_clip", nn.Sigmoid())
        if linear.act_format is not None and linear.act_clip is None:
            linear.act_clip = nn.Parameter(torch.full((1,), CLIP_INIT_LOGIT))
            parametrize.register_parametrization(linear, "act_clip", nn.Sigmoid())
        linear.to(linear.weight.device)


def clipping_summary(points: list[Point]) -> dict[str, dict[str, float]]:
    """min, mean and max of the learned clipping ratios, weights (per output channel) and activations
    (per layer) apart: how far learning moved them from their start of 0.982."""
    ratios: dict[str, list[torch.Tensor]] = {"weight": [], "act": []}
    for _, _, linear in points:
        for kind, clip in (("weight", linear.weight_clip), ("act", linear.act_clip)):
            if clip is not None:
                ratios[kind].append(clip.detach().float().flatten().cpu())
    summary = {}
    for kind, parts in ratios.items():
        if parts:
            values = torch.cat(parts)
            summary[kind] = {"min": float(values.min()), "mean": float(values.mean()), "max": float(values.max())}
    return summary


def trainable(prepared: PreparedModel, points: list[Point], learn_clipping: bool) -> Groups:
    """Trainable parameters grouped by owner: a transform name or a quantized linear's module name."""
    groups: Groups = {}
    for tname, transform in prepared.transforms.items():
        params = {f"{tname}.{n}": p for n, p in transform.named_parameters() if p.requires_grad}
        if params:
            groups[tname] = params
    if learn_clipping:
        for name, _, linear in points:
            params = {f"{name}.{n}": p for n, p in linear.named_parameters() if is_clipping(n)}
            if params:
                groups[name] = params
    return groups


def is_clipping(name: str) -> bool:
    """Whether a parameter name is a learned clipping logit (weight_clip, act_clip)."""
    return "_clip" in name


def param_groups(params: dict[str, nn.Parameter], optim_cfg: OptimConfig) -> list[dict]:
    """The optimizer's parameter groups: the clipping logits at optim.clip_lr when it is set, the rest at
    optim.lr; none when there is nothing to train (so build_optimizer says so)."""
    if optim_cfg.clip_lr is None:
        groups = [{"params": list(params.values()), "base_lr": optim_cfg.lr}]
    else:
        groups = [
            {"params": [p for n, p in params.items() if not is_clipping(n)], "base_lr": optim_cfg.lr},
            {"params": [p for n, p in params.items() if is_clipping(n)], "base_lr": optim_cfg.clip_lr},
        ]
    return [group for group in groups if group["params"]]


def flat(groups: Groups) -> dict[str, nn.Parameter]:
    return {name: p for params in groups.values() for name, p in params.items()}


@dataclass
class Trainer:
    """Optimizer, schedule, guards and checkpoint state for one set of trainable parameters."""

    groups: Groups
    cfg: CalibConfig
    optim_cfg: OptimConfig
    total_steps: int
    label: str

    def __post_init__(self) -> None:
        self.params = flat(self.groups)
        self.optimizer = build_optimizer(param_groups(self.params, self.optim_cfg), self.optim_cfg)
        self.best = param_state(self.params)
        self.rolled_back: list[str] = []

    def step(self, step: int, losses: Iterable[torch.Tensor]) -> float:
        """One optimizer step on the summed gradients of `losses` (`micro_losses`); returns the step's loss."""
        set_lr(self.optimizer, step, self.total_steps, self.optim_cfg)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for loss in losses:
            if not torch.isfinite(loss):
                raise NonFiniteError(
                    f"non-finite loss in {self.label} at step {step}; {describe_parameters(self.params)}"
                )
            loss.backward()
            total += float(loss.detach())
        clip_gradients(list(self.params.values()), self.optim_cfg)
        self.optimizer.step()
        return total

    def guard_conditioning(self, transforms: dict[str, Transform]) -> None:
        """Roll any transform whose condition number passed cond_limit back to its last good state, then fix it."""
        for owner, params in self.groups.items():
            transform = transforms.get(owner)
            if transform is None or transform.orthogonal:
                continue
            cond = transform.condition_number()
            if math.isfinite(cond) and cond <= self.cfg.cond_limit:
                self.best.update(param_state(params))
                continue
            warnings.warn(
                f"transform {owner}: condition number {cond:.3g} passed calib.cond_limit={self.cfg.cond_limit:g}; "
                "rolled back to its last good state and kept fixed",
                RuntimeWarning,
                stacklevel=2,
            )
            load_params(params, {n: self.best[n] for n in params})
            for p in params.values():
                p.requires_grad_(False)
            self.rolled_back.append(owner)

    def state(self) -> dict[str, Any]:
        return {
            "params": param_state(self.params),
            "best": dict(self.best),
            "optimizer": self.optimizer.state_dict(),
            "rolled_back": list(self.rolled_back),
        }

    def load(self, state: dict[str, Any]) -> None:
        load_params(self.params, state["params"])
        self.best = dict(state["best"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rolled_back = list(state["rolled_back"])
        for owner in self.rolled_back:
            for p in self.groups[owner].values():
                p.requires_grad_(False)


def micro_losses(
    cfg: CalibConfig,
    indices: torch.Tensor,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    around: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Iterator[torch.Tensor]:
    """A step's loss in micro-batches of calib.micro_batch_size sequences, each weighted by its share of
    the batch, so their gradients sum to the batch's (exactly so for a mean over tokens). Each loss is
    yielded inside `around()`, which therefore stays open through that micro-batch's backward."""
    for chunk in indices.split(cfg.micro_batch_size or len(indices)):
        with around():
            yield loss_of(chunk) * (len(chunk) / len(indices))


def batches_per_epoch(cfg: CalibConfig, n: int) -> int:
    return math.ceil(n / cfg.batch_size)


def total_steps(cfg: CalibConfig, n: int) -> int:
    total = cfg.epochs * batches_per_epoch(cfg, n)
    return total if cfg.steps is None else min(total, cfg.steps)


def batch_indices(cfg: CalibConfig, n: int, step: int) -> torch.Tensor:
    """The sequences of a step: a permutation seeded by (seed, epoch), so the order depends on nothing else."""
    per_epoch = batches_per_epoch(cfg, n)
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
    return order[within * cfg.batch_size : (within + 1) * cfg.batch_size]


def autocast(cfg: CalibConfig, device: torch.device):
    enabled = device.type == "cuda" and cfg.autocast_dtype is not None
    dtype = AUTOCAST_DTYPES[cfg.autocast_dtype] if cfg.autocast_dtype is not None else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


@contextlib.contextmanager
def matrices_built_once(learned: list[Transform]) -> Iterator[None]:
    """Build every learned map's matrices once, before the forward, and keep them through the backward.

    transforms.cached_transforms shares them across the linears that fold the same map. Building them
    up front, outside any checkpointed block, keeps the tensors a checkpointed block saves the same in
    its forward and in its recomputation during backward (torch.utils.checkpoint checks this).
    """
    with cached_transforms():
        for transform in learned:
            transform.matrix()
            if not transform.orthogonal:
                transform.inverse_matrix()
        yield
