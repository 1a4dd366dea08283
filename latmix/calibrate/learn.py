"""The LATMiX optimization: learn the transforms of a prepared model through the MX quantizer.

Two modes share the trainable parameters, objectives, optimizers and checkpoints:

- end_to_end (LATMiX): every learnable transform (T1 on the residual stream, T2 per block on v->o,
  pre-linear and down_proj maps) trained jointly on the quantized model's next-token KL to the
  full-precision model, gradients through the quantizer by the straight-through estimator;
- layer_wise (FlatQuant): one decoder block at a time, its input propagated through the already
  calibrated, quantized earlier blocks, its loss the normalized MSE to the full-precision block
  output. The global T1 stays at its initialization: this mode learns the per-block maps.

Either mode can instead minimize the bound surrogate (objective="bound"). A volume regularizer
(sum log|s|)^2 = (log|det A|)^2 is added with weight reg_weight. Checkpoints (every checkpoint_every
steps end to end, after every block layer-wise) hold plain tensors only and are loaded with
weights_only=True; a second call with the same arguments resumes from them and ends with the same
transforms as an uninterrupted run. calibrate() ends by folding the transforms (freeze_model), so GPTQ
or evaluation can follow.

Models whose blocks are offloaded (latmix.offload, calib.offload) work unchanged: layer-wise holds the
block it calibrates on the device, and whole-model measurements stream the blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from latmix.bound import bound_of_transformed, error_of_transformed
from latmix.data import SOURCES
from latmix.losses import (
    OBJECTIVES,
    QuantizedOperand,
    block_mse,
    bound_loss,
    next_token_kl,
    volume_regularizer,
)
from latmix.models import get_adapter
from latmix.offload import resident
from latmix.optim import OptimConfig, build_optimizer, clip_gradients, set_lr
from latmix.quantize import QuantLinear, freeze_model, quantization_disabled, transforms_of
from latmix.transforms import Transform, cached_transforms

__all__ = [
    "MODES",
    "CalibConfig",
    "CalibrationReport",
    "CheckpointMismatch",
    "NonFiniteError",
    "block_inputs",
    "calibrate",
    "decoder_layers",
    "run_block",
]

MODES = ("end_to_end", "layer_wise", "none")

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
CHECKPOINT_FILE = "calibration.pt"
# Sequences used to measure bound, error and losses before and after learning.
MEASURE_SEQUENCES = 4
# FlatQuant initializes its clipping logits at 4: sigmoid(4) = 0.982 of the block max.
CLIP_INIT_LOGIT = 4.0


@dataclass
class CalibConfig:
    """The calibration settings (the Hydra group calib/); the defaults are the project's reading of LATMiX."""

    mode: str = "end_to_end"
    objective: str = "kl"
    epochs: int = 2
    steps: int | None = None
    batch_size: int = 4
    n_samples: int = 128
    seq_len: int = 2048
    source: str = "wikitext2"
    reg_weight: float = 1e-2
    learn_clipping: bool = False
    cond_limit: float = 1e4
    checkpoint_every: int = 50
    seed: int = 0
    grad_checkpointing: bool = True
    autocast_dtype: str | None = "bfloat16"
    offload: bool = False

    def __post_init__(self) -> None:
        _check_choice("calib.mode", self.mode, MODES)
        _check_choice("calib.objective", self.objective, OBJECTIVES)
        _check_choice("calib.source", self.source, SOURCES)
        if self.autocast_dtype is not None:
            _check_choice("calib.autocast_dtype", self.autocast_dtype, tuple(AUTOCAST_DTYPES))
        for name in ("epochs", "batch_size", "n_samples", "seq_len", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"calib.{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"calib.steps must be >= 1 or null (no cap), got {self.steps}")
        if self.reg_weight < 0:
            raise ValueError(f"calib.reg_weight must be >= 0, got {self.reg_weight}")
        if not self.cond_limit > 1:
            raise ValueError(f"calib.cond_limit must be > 1 (a condition number), got {self.cond_limit}")
        if self.mode == "end_to_end" and self.objective == "block_mse":
            raise ValueError(
                "objective block_mse is the layer_wise loss; use mode=layer_wise or objective kl/bound"
            )
        if self.offload and self.mode == "end_to_end":
            raise ValueError(
                "calib.offload keeps one block on the GPU, but end_to_end backpropagates through every block "
                "at once; use mode=layer_wise (or none) with offload, or offload: false"
            )
        if self.mode == "layer_wise" and self.objective == "kl":
            raise ValueError(
                "objective kl needs the whole model; use mode=end_to_end or objective block_mse/bound"
            )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(str, choices))}")


class NonFiniteError(FloatingPointError):
    """A loss or activation became NaN/Inf during calibration; the message names where and which parameters."""


class CheckpointMismatch(ValueError):
    """The checkpoint in ckpt_dir was written by a different calibration."""


# --- the report ----------------------------------------------------------------------------------


@dataclass
class CalibrationReport:
    """What calibration did, for the result record (DESIGN.md `calibration:`)."""

    mode: str
    objective: str
    seconds: float = 0.0
    steps: int = 0
    loss_before: float | None = None
    loss_after: float | None = None
    per_layer: list[dict[str, Any]] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    resumed_from_step: int | None = None

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


# --- the model's quantization points -------------------------------------------------------------


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return get_adapter(model).layers()


def _hidden(output: Any) -> torch.Tensor:
    """A decoder block's hidden states (transformers 5 returns a tensor, older versions a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def _quant_points(model: nn.Module) -> list[tuple[str, int, QuantLinear]]:
    """(module name, block index, QuantLinear) for every quantized linear inside a decoder block."""
    block_of = {id(m): i for i, layer in enumerate(decoder_layers(model)) for m in layer.modules()}
    return [
        (name, block_of[id(m)], m)
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear) and id(m) in block_of
    ]


def _composite_matrix(linear: QuantLinear) -> torch.Tensor | None:
    """A such that the quantized operand is A x + b of the untransformed activation x (None: no map)."""
    chain = [*linear.folded_in, *linear.online_in]
    if not chain:
        return None
    A = chain[0].matrix()
    for transform in chain[1:]:
        A = transform.matrix() @ A
    return A


def _chain_key(linear: QuantLinear) -> tuple[int, ...]:
    """Names the map chain in front of a linear: linears with equal keys quantize through the same A."""
    return (linear.in_features, *(id(t) for t in (*linear.folded_in, *linear.online_in)))


@contextlib.contextmanager
def _captured_operands(model: nn.Module, points: list[tuple[str, int, QuantLinear]]) -> Iterator[list]:
    """Record, for every activation-quantized point, its operand y (differentiable) during forwards."""
    operands: list[QuantizedOperand] = []
    # Linears behind the same chain (q/k/v, gate/up) share one composite matrix per forward.
    composites: dict[tuple[int, ...], torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, args):
            if not module.quantize_acts:
                return
            y = module.transformed_input(args[0])
            key = _chain_key(module)
            if key not in composites:
                A = _composite_matrix(module)
                composites[key] = torch.eye(y.shape[-1], device=y.device) if A is None else A
            operands.append(
                QuantizedOperand(name, y, composites[key], module.act_format, module.act_block_size)
            )

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, _, m in points]
    try:
        yield operands
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _finite_guard(model: nn.Module, params: dict[str, nn.Parameter]) -> Iterator[None]:
    """Stop at the first quantized linear whose input or output is NaN/Inf, naming it and the bad parameters."""

    def hook_for(name: str):
        def hook(module, args, output):
            for what, tensor in (("input", args[0]), ("output", output)):
                if not torch.isfinite(tensor).all():
                    raise NonFiniteError(
                        f"non-finite activation at the {what} of {name}; {_describe_parameters(params)}"
                    )

        return hook

    handles = [
        m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if isinstance(m, QuantLinear)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _describe_parameters(params: dict[str, nn.Parameter]) -> str:
    bad = [name for name, p in params.items() if not torch.isfinite(p).all()]
    if bad:
        return f"non-finite parameters: {', '.join(bad)}"
    if not params:
        return "no trainable parameters (check the model's inputs and weights)"
    largest = max(params, key=lambda n: float(params[n].detach().abs().max()))
    return f"all parameters finite; the largest in magnitude is {largest} (try a lower optim.lr)"


# --- trainable parameters ------------------------------------------------------------------------


def _install_clipping(points: list[tuple[str, int, QuantLinear]]) -> None:
    """FlatQuant's LWC/LAC: per-output-channel weight and per-layer activation clip ratios, sigmoid-bounded."""
    for _, _, linear in points:
        if linear.weight_format is not None and linear.weight_clip is None:
            linear.weight_clip = nn.Parameter(torch.full((linear.out_features, 1, 1), CLIP_INIT_LOGIT))
            parametrize.register_parametrization(linear, "weight_clip", nn.Sigmoid())
        if linear.act_format is not None and linear.act_clip is None:
            linear.act_clip = nn.Parameter(torch.full((1,), CLIP_INIT_LOGIT))
            parametrize.register_parametrization(linear, "act_clip", nn.Sigmoid())
        linear.to(linear.weight.device)


def _trainable(model: nn.Module, cfg: CalibConfig) -> dict[str, dict[str, nn.Parameter]]:
    """Trainable parameters grouped by owner: a transform name or a quantized linear's module name."""
    groups: dict[str, dict[str, nn.Parameter]] = {}
    for tname, transform in transforms_of(model).items():
        params = {f"{tname}.{n}": p for n, p in transform.named_parameters() if p.requires_grad}
        if params:
            groups[tname] = params
    if cfg.learn_clipping:
        for name, _, linear in _quant_points(model):
            params = {f"{name}.{n}": p for n, p in linear.named_parameters() if "_clip" in n}
            if params:
                groups[name] = params
    return groups


def _block_index(owner: str) -> int | None:
    """The decoder block an owner belongs to ("layers.3.attn_vo", "model.layers.3.mlp.up_proj"), if any."""
    parts = owner.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _flat(groups: dict[str, dict[str, nn.Parameter]]) -> dict[str, nn.Parameter]:
    return {name: p for params in groups.values() for name, p in params.items()}


# --- checkpoints ---------------------------------------------------------------------------------


def _fingerprint(cfg: CalibConfig, optim_cfg: OptimConfig, calib_ids: torch.Tensor, names: list[str]) -> str:
    ids = calib_ids.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()
    text = repr((asdict(cfg), asdict(optim_cfg), sorted(names)))
    return hashlib.sha256(text.encode() + hashlib.sha256(ids).digest()).hexdigest()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(ckpt_dir: Path, state: dict[str, Any]) -> None:
    """Write atomically: a preempted write leaves the previous checkpoint intact."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".{CHECKPOINT_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt_dir / CHECKPOINT_FILE)


def _load_checkpoint(ckpt_dir: Path | None, fingerprint: str) -> dict[str, Any] | None:
    if ckpt_dir is None or not (ckpt_dir / CHECKPOINT_FILE).is_file():
        return None
    state = torch.load(ckpt_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        raise CheckpointMismatch(
            f"the checkpoint in {ckpt_dir} was written by a different calibration (config, data or model); "
            "delete it or point ckpt_dir elsewhere"
        )
    return state


def _param_state(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in params.items()}


@torch.no_grad()
def _load_params(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    for name, p in params.items():
        p.copy_(state[name].to(p.device))


# --- measurement: bound, error, losses -----------------------------------------------------------


def _inverse_and_conditioning(A: torch.Tensor | None) -> tuple[float, torch.Tensor | None, float]:
    """(||A^-1||_2, A^-1, condition number) in float64; (1, None, 1) where no map stands in front."""
    if A is None:
        return 1.0, None, 1.0
    A = A.detach().double()
    sigma = torch.linalg.svdvals(A)
    return float(1.0 / sigma.min()), torch.linalg.inv(A), float(sigma.max() / sigma.min())


@torch.no_grad()
def _measure_points(
    model: nn.Module, ids: torch.Tensor | None, params: dict[str, nn.Parameter]
) -> dict[str, dict[str, float]]:
    """Bound, actual error and condition number of every activation-quantized linear, on ids."""
    if ids is None:
        return {}
    points = _quant_points(model)
    stats: dict[str, dict[str, float]] = {}
    inverse_cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, float]] = {}

    def hook_for(name: str):
        def hook(module, args):
            if not module.quantize_acts:
                return
            y = module.transformed_input(args[0]).float().reshape(-1, module.in_features)
            if not torch.isfinite(y).all():
                raise NonFiniteError(
                    f"non-finite activation at the quantized input of {name}; {_describe_parameters(params)}"
                )
            key = _chain_key(module)
            if key not in inverse_cache:
                inverse_cache[key] = _inverse_and_conditioning(_composite_matrix(module))
            inv_norm, A_inv, cond = inverse_cache[key]
            stats[name] = {
                "bound": float(bound_of_transformed(y, inv_norm, module.act_format, module.act_block_size)),
                "error": float(error_of_transformed(y, A_inv, module.act_format, module.act_block_size)),
                "cond": cond,
            }

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, _, m in points]
    try:
        model(ids.to(_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _block_outputs(model: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(output of every decoder block, logits) of one forward."""
    outputs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda m, a, out: outputs.append(_hidden(out)))
        for layer in decoder_layers(model)
    ]
    try:
        logits = model(ids.to(_device(model))).logits
    finally:
        for handle in handles:
            handle.remove()
    return outputs, logits


@torch.no_grad()
def _measure_losses(model: nn.Module, fp_model: nn.Module, ids: torch.Tensor) -> tuple[float, list[float]]:
    """(next-token KL to the full-precision model, normalized MSE of every block's output) on ids.

    Block outputs are compared with the same model run unquantized: it computes the full-precision
    function in the transformed basis (T1 may already be folded away), exactly for orthogonal T1.
    """
    outputs, logits = _block_outputs(model, ids)
    with quantization_disabled(model):
        references, _ = _block_outputs(model, ids)
    with torch.no_grad():
        fp_logits = fp_model(ids.to(_device(fp_model))).logits.to(logits.device)
    kl = float(next_token_kl(logits, fp_logits))
    per_block = [float(block_mse(out, ref)) for out, ref in zip(outputs, references, strict=True)]
    return kl, per_block


@dataclass
class _Snapshot:
    """Bound/error/loss measurements at one moment (before or after learning)."""

    kl: float
    block_losses: list[float]
    calib: dict[str, dict[str, float]]
    heldout: dict[str, dict[str, float]]


def _snapshot(
    model: nn.Module,
    fp_model: nn.Module,
    ids: torch.Tensor,
    heldout_ids: torch.Tensor | None,
    params: dict[str, nn.Parameter],
) -> _Snapshot:
    was_training = model.training
    model.eval()
    try:
        kl, block_losses = _measure_losses(model, fp_model, ids)
        calib, heldout = _measure_points(model, ids, params), _measure_points(model, heldout_ids, params)
        return _Snapshot(kl, block_losses, calib, heldout)
    finally:
        model.train(was_training)


def _per_layer_rows(
    points: list[tuple[str, int, QuantLinear]], before: _Snapshot, after: _Snapshot, seconds: dict[int, float]
) -> list[dict[str, Any]]:
    rows = []
    for name, block, _ in points:
        if name not in after.calib:
            continue
        b, a = before.calib[name], after.calib[name]
        hb, ha = before.heldout.get(name, {}), after.heldout.get(name, {})
        rows.append(
            {
                "layer": name,
                "block": block,
                "loss_before": before.block_losses[block],
                "loss_after": after.block_losses[block],
                "bound_before": b["bound"],
                "bound_after": a["bound"],
                "error_before": b["error"],
                "error_after": a["error"],
                "tightness_before": b["error"] / b["bound"] if b["bound"] else 0.0,
                "tightness_after": a["error"] / a["bound"] if a["bound"] else 0.0,
                "heldout_bound_before": hb.get("bound"),
                "heldout_bound_after": ha.get("bound"),
                "heldout_error_before": hb.get("error"),
                "heldout_error_after": ha.get("error"),
                "cond": a["cond"],
                "seconds": seconds.get(block),
            }
        )
    return rows


# --- the training step, shared by both modes -----------------------------------------------------


@dataclass
class _Trainer:
    """Optimizer, schedule, guards and checkpoint state for one set of trainable parameters."""

    groups: dict[str, dict[str, nn.Parameter]]
    cfg: CalibConfig
    optim_cfg: OptimConfig
    total_steps: int
    label: str

    def __post_init__(self) -> None:
        self.params = _flat(self.groups)
        self.optimizer = build_optimizer(list(self.params.values()), self.optim_cfg)
        self.best = _param_state(self.params)
        self.rolled_back: list[str] = []

    def step(self, step: int, loss: torch.Tensor) -> float:
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"non-finite loss in {self.label} at step {step}; {_describe_parameters(self.params)}"
            )
        set_lr(self.optimizer, step, self.total_steps, self.optim_cfg)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(list(self.params.values()), self.optim_cfg)
        self.optimizer.step()
        return float(loss.detach())

    def guard_conditioning(self, transforms: dict) -> None:
        """Roll any transform whose condition number passed cond_limit back to its last good state, then fix it."""
        for owner, params in self.groups.items():
            transform = transforms.get(owner)
            if transform is None or transform.orthogonal:
                continue
            cond = transform.condition_number()
            if math.isfinite(cond) and cond <= self.cfg.cond_limit:
                self.best.update(_param_state(params))
                continue
            warnings.warn(
                f"transform {owner}: condition number {cond:.3g} passed calib.cond_limit={self.cfg.cond_limit:g}; "
                "rolled back to its last good state and kept fixed",
                RuntimeWarning,
                stacklevel=2,
            )
            _load_params(params, {n: self.best[n] for n in params})
            for p in params.values():
                p.requires_grad_(False)
            self.rolled_back.append(owner)

    def state(self) -> dict[str, Any]:
        return {
            "params": _param_state(self.params),
            "best": dict(self.best),
            "optimizer": self.optimizer.state_dict(),
            "rolled_back": list(self.rolled_back),
        }

    def load(self, state: dict[str, Any]) -> None:
        _load_params(self.params, state["params"])
        self.best = dict(state["best"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rolled_back = list(state["rolled_back"])
        for owner in self.rolled_back:
            for p in self.groups[owner].values():
                p.requires_grad_(False)


def _batches_per_epoch(cfg: CalibConfig, n: int) -> int:
    return math.ceil(n / cfg.batch_size)


def _total_steps(cfg: CalibConfig, n: int) -> int:
    total = cfg.epochs * _batches_per_epoch(cfg, n)
    return total if cfg.steps is None else min(total, cfg.steps)


def _batch_indices(cfg: CalibConfig, n: int, step: int) -> torch.Tensor:
    """The sequences of a step: a permutation seeded by (seed, epoch), so the order depends on nothing else."""
    per_epoch = _batches_per_epoch(cfg, n)
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
    return order[within * cfg.batch_size : (within + 1) * cfg.batch_size]


def _autocast(cfg: CalibConfig, device: torch.device):
    enabled = device.type == "cuda" and cfg.autocast_dtype is not None
    dtype = AUTOCAST_DTYPES[cfg.autocast_dtype] if cfg.autocast_dtype is not None else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


@contextlib.contextmanager
def _gradient_checkpointing(model: nn.Module, cfg: CalibConfig) -> Iterator[None]:
    """HF gradient checkpointing for the duration (it acts in train mode; Llama has no dropout to wake)."""
    enabled = cfg.grad_checkpointing and getattr(model, "supports_gradient_checkpointing", False)
    if not enabled:
        yield
        return
    was_training = model.training
    # transformers 5 renamed gradient checkpointing to activation checkpointing; 4.x has only the old name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        disable = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable = model.gradient_checkpointing_disable
    model.train()
    try:
        yield
    finally:
        disable()
        model.train(was_training)


# --- end to end ----------------------------------------------------------------------------------

StepCallback = Callable[[dict[str, Any]], None]


def _end_to_end_loss(
    model: nn.Module, fp_model: nn.Module, ids: torch.Tensor, cfg: CalibConfig, points: list, transforms: list
) -> torch.Tensor:
    device = _device(model)
    with torch.no_grad():
        ref_logits = fp_model(ids.to(_device(fp_model))).logits.to(device)
    if cfg.objective == "bound":
        with _captured_operands(model, points) as operands, _autocast(cfg, device):
            model(ids.to(device), use_cache=False)
        loss = bound_loss(operands)
    else:
        with _autocast(cfg, device):
            logits = model(ids.to(device), use_cache=False).logits
        loss = next_token_kl(logits, ref_logits)
    return loss + cfg.reg_weight * volume_regularizer(transforms).to(loss.device)


@contextlib.contextmanager
def _matrices_built_once(learned: list[Transform]) -> Iterator[None]:
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


def _run_end_to_end(
    model, fp_model, calib_ids, cfg, optim_cfg, groups, ckpt_dir, fingerprint, resume, on_step
) -> tuple[int, list[str]]:
    transforms = transforms_of(model)
    learned = [transforms[o] for o in groups if o in transforms]
    points = _quant_points(model)
    total = _total_steps(cfg, calib_ids.shape[0])
    trainer = _Trainer(groups, cfg, optim_cfg, total, "end-to-end calibration")
    start = 0
    if resume is not None:
        trainer.load(resume["trainer"])
        _set_rng_state(resume["rng"])
        start = resume["step"]
    progress = tqdm(range(start, total), desc="calibrate end_to_end", initial=start, total=total, leave=False)
    with _gradient_checkpointing(model, cfg), _finite_guard(model, trainer.params):
        for step in progress:
            ids = calib_ids[_batch_indices(cfg, calib_ids.shape[0], step)]
            with _matrices_built_once(learned):
                loss = trainer.step(step, _end_to_end_loss(model, fp_model, ids, cfg, points, learned))
            progress.set_postfix(
                loss=f"{loss:.4g}", epoch=step // _batches_per_epoch(cfg, calib_ids.shape[0])
            )
            done = step + 1
            if done % cfg.checkpoint_every == 0 or done == total:
                trainer.guard_conditioning(transforms)
                if ckpt_dir is not None:
                    _save_checkpoint(
                        ckpt_dir,
                        {
                            "fingerprint": fingerprint,
                            "step": done,
                            "trainer": trainer.state(),
                            "rng": _rng_state(),
                        },
                    )
            if on_step is not None:
                on_step({"mode": "end_to_end", "step": done, "loss": loss})
    return total, trainer.rolled_back


# --- layer-wise ----------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook to end a forward once the first block's inputs are captured."""


@torch.no_grad()
def _firstblock_inputs(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """(hidden states entering block 0, the keyword arguments every block is called with) for ids."""
    captured: dict[str, Any] = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    # prepend: stop before an offloaded block 0 would be moved to the device for nothing.
    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        model(ids.to(_device(model)), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["hidden"], captured["kwargs"]


def block_inputs(model: nn.Module, calib_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Block-0 inputs of every calibration sequence, and the shared block kwargs (from one sequence)."""
    first, kwargs = _firstblock_inputs(model, calib_ids[:1])
    rest = [_firstblock_inputs(model, calib_ids[i : i + 1])[0] for i in range(1, calib_ids.shape[0])]
    return torch.cat([first, *rest]), kwargs


@torch.no_grad()
def run_block(
    block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any], batch_size: int
) -> torch.Tensor:
    return torch.cat(
        [_hidden(block(inputs[i : i + batch_size], **kwargs)) for i in range(0, inputs.shape[0], batch_size)]
    )


def _layer_wise_loss(
    block: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    kwargs: dict,
    cfg: CalibConfig,
    points: list,
    transforms,
) -> torch.Tensor:
    if cfg.objective == "bound":
        with _captured_operands(block, points) as operands, _autocast(cfg, x.device):
            block(x, **kwargs)
        loss = bound_loss(operands)
    else:
        with _autocast(cfg, x.device):
            loss = block_mse(_hidden(block(x, **kwargs)), target)
    return loss + cfg.reg_weight * volume_regularizer(transforms).to(loss.device)


def _train_block(
    trainer: _Trainer,
    block: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor, dict[str, Any]],
    points: list,
    transforms: dict[str, Transform],
    index: int,
) -> None:
    """All optimizer steps of one block: its quantized inputs x_q against its full-precision targets."""
    x_q, target, kwargs = data
    cfg = trainer.cfg
    learned = [transforms[o] for o in trainer.groups if o in transforms]
    progress = tqdm(range(trainer.total_steps), desc=f"block {index}", leave=False)
    with _finite_guard(block, trainer.params):
        for step in progress:
            idx = _batch_indices(cfg, x_q.shape[0], step)
            loss = trainer.step(step, _layer_wise_loss(block, x_q[idx], target[idx], kwargs, cfg, points, learned))
            progress.set_postfix(loss=f"{loss:.4g}")


def _run_layer_wise(
    model, fp_model, calib_ids, cfg, optim_cfg, groups, ckpt_dir, fingerprint, resume, on_step
) -> tuple[int, list[str], dict[int, float]]:
    """Block by block: block i of the quantized model, fed the quantized stream, learns to reproduce the
    full-precision block i on the full-precision stream (mapped by the fixed T1 into the model's basis).
    The targets come from fp_model, so they do not depend on any parameter being learned."""
    transforms = transforms_of(model)
    residual = transforms.get("residual")
    if residual is not None:
        residual.requires_grad_(False)
    layers, fp_layers = decoder_layers(model), decoder_layers(fp_model)
    points = _quant_points(model)
    x_q, kwargs = block_inputs(model, calib_ids)
    x_fp, fp_kwargs = block_inputs(fp_model, calib_ids)
    first, steps_done, rolled_back, seconds = 0, 0, [], {}
    if resume is not None:
        first, steps_done = resume["block"], resume["steps_done"]
        rolled_back, seconds = list(resume["rolled_back"]), dict(resume["seconds"])
        _load_params(_flat(groups), resume["params"])
        _set_rng_state(resume["rng"])
    n = calib_ids.shape[0]
    total = _total_steps(cfg, n)
    for i in tqdm(range(len(layers)), desc="calibrate layer_wise", leave=False):
        block = layers[i]
        with resident(fp_model, fp_layers[i]):
            x_fp = run_block(fp_layers[i], x_fp, fp_kwargs, cfg.batch_size)
        with torch.no_grad():
            target = x_fp if residual is None else residual(x_fp)
        block_groups = {o: ps for o, ps in groups.items() if _block_index(o) == i and o not in rolled_back}
        with resident(model, block):
            if i >= first and block_groups:
                started = time.perf_counter()
                trainer = _Trainer(block_groups, cfg, optim_cfg, total, f"layer-wise calibration of block {i}")
                _train_block(
                    trainer, block, (x_q, target, kwargs), [p for p in points if p[1] == i], transforms, i
                )
                trainer.guard_conditioning(transforms)
                rolled_back += trainer.rolled_back
                steps_done += total
                seconds[i] = time.perf_counter() - started
            x_q = run_block(block, x_q, kwargs, cfg.batch_size)
        if i >= first and ckpt_dir is not None:
            _save_checkpoint(
                ckpt_dir,
                {
                    "fingerprint": fingerprint,
                    "block": i + 1,
                    "steps_done": steps_done,
                    "rolled_back": rolled_back,
                    "seconds": seconds,
                    "params": _param_state(_flat(groups)),
                    "rng": _rng_state(),
                },
            )
        if i >= first and on_step is not None:
            on_step({"mode": "layer_wise", "block": i, "step": steps_done})
    return steps_done, rolled_back, seconds


# --- the one call --------------------------------------------------------------------------------


def calibrate(
    model: nn.Module,
    fp_model: nn.Module,
    calib_ids: torch.Tensor,
    calib_cfg: CalibConfig,
    optim_cfg: OptimConfig,
    ckpt_dir: Path | str | None,
    *,
    heldout_ids: torch.Tensor | None = None,
    on_step: StepCallback | None = None,
) -> CalibrationReport:
    """Learn the transforms of a prepared `model` against `fp_model`; fold them; report what changed.

    calib_ids (N, L) are the calibration sequences; heldout_ids (optional) are only measured on.
    ckpt_dir holds the latest checkpoint: a call with the same arguments resumes from it. on_step is
    called after every optimizer step (end to end) or block (layer-wise) with a progress dict; an
    exception it raises stops calibration there, as a preemption would.
    """
    started = time.perf_counter()
    if calib_ids.dim() != 2:
        raise ValueError(f"calib_ids must be (n_sequences, seq_len), got shape {tuple(calib_ids.shape)}")
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
    fp_model.eval().requires_grad_(False)
    measure_ids = calib_ids[:MEASURE_SEQUENCES]
    heldout = None if heldout_ids is None else heldout_ids[:MEASURE_SEQUENCES]
    points = _quant_points(model)
    if calib_cfg.learn_clipping and calib_cfg.mode != "none":
        _install_clipping(points)
    groups = _trainable(model, calib_cfg) if calib_cfg.mode != "none" else {}
    report = CalibrationReport(mode=calib_cfg.mode, objective=calib_cfg.objective)

    before = _snapshot(model, fp_model, measure_ids, heldout, _flat(groups))
    seconds: dict[int, float] = {}
    if groups:
        fingerprint = _fingerprint(calib_cfg, optim_cfg, calib_ids, list(_flat(groups)))
        resume = _load_checkpoint(ckpt_dir, fingerprint)
        if resume is not None:
            report.resumed_from_step = resume.get("step", resume.get("steps_done"))
        args = (
            model,
            fp_model,
            calib_ids,
            calib_cfg,
            optim_cfg,
            groups,
            ckpt_dir,
            fingerprint,
            resume,
            on_step,
        )
        if calib_cfg.mode == "end_to_end":
            report.steps, report.rolled_back = _run_end_to_end(*args)
        else:
            report.steps, report.rolled_back, seconds = _run_layer_wise(*args)
    after = _snapshot(model, fp_model, measure_ids, heldout, _flat(groups))
    report.loss_before, report.loss_after = before.kl, after.kl
    report.per_layer = _per_layer_rows(points, before, after, seconds)
    for params in groups.values():
        for p in params.values():
            p.requires_grad_(False)
    freeze_model(model)
    report.seconds = time.perf_counter() - started
    return report
