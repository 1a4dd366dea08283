"""What calibration measures and watches in a prepared model.

- the quantization points: every quantized linear inside a decoder block, and the composite map A in
  front of its operand;
- the operands y = A x + b as the model quantizes them (for the bound objective);
- the non-finite guard: the first quantized linear whose input or output is NaN/Inf stops the run;
- per point, the error bound of DESIGN.md, the actual error and the condition number of A, and per
  block the normalized output error, before and after learning (the record's per-layer rows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from latmix.bound import bound_of_transformed, error_of_transformed
from latmix.fidelity import next_token_kl
from latmix.hooks import Hooks
from latmix.losses import QuantizedOperand, block_mse
from latmix.models import block_output, decoder_layers, input_device
from latmix.quantize import QuantLinear, quantization_disabled

__all__ = [
    "NonFiniteError",
    "Point",
    "Snapshot",
    "captured_operands",
    "describe_parameters",
    "finite_guard",
    "per_layer_rows",
    "quant_points",
    "snapshot",
]

# (module name, block index, the quantized linear)
Point = tuple[str, int, QuantLinear]


class NonFiniteError(FloatingPointError):
    """A loss or activation became NaN/Inf during calibration; the message names where and which parameters."""


def quant_points(model: nn.Module) -> list[Point]:
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
def captured_operands(points: list[Point]) -> Iterator[list[QuantizedOperand]]:
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

    with Hooks() as hooks:
        for name, _, linear in points:
            hooks.pre(linear, hook_for(name))
        yield operands


@contextlib.contextmanager
def finite_guard(model: nn.Module, params: dict[str, nn.Parameter]) -> Iterator[None]:
    """Stop at the first quantized linear whose input or output is NaN/Inf, naming it and the bad parameters."""

    def hook_for(name: str):
        def hook(module, args, output):
            for what, tensor in (("input", args[0]), ("output", output)):
                if not torch.isfinite(tensor).all():
                    raise NonFiniteError(
                        f"non-finite activation at the {what} of {name}; {describe_parameters(params)}"
                    )

        return hook

    with Hooks() as hooks:
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                hooks.post(module, hook_for(name))
        yield


def describe_parameters(params: dict[str, nn.Parameter]) -> str:
    bad = [name for name, p in params.items() if not torch.isfinite(p).all()]
    if bad:
        return f"non-finite parameters: {', '.join(bad)}"
    if not params:
        return "no trainable parameters (check the model's inputs and weights)"
    largest = max(params, key=lambda n: float(params[n].detach().abs().max()))
    return f"all parameters finite; the largest in magnitude is {largest} (try a lower optim.lr)"


# --- bound, error, losses ------------------------------------------------------------------------


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
    stats: dict[str, dict[str, float]] = {}
    inverse_cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, float]] = {}

    def hook_for(name: str):
        def hook(module, args):
            if not module.quantize_acts:
                return
            y = module.transformed_input(args[0]).float().reshape(-1, module.in_features)
            if not torch.isfinite(y).all():
                raise NonFiniteError(
                    f"non-finite activation at the quantized input of {name}; {describe_parameters(params)}"
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

    with Hooks() as hooks:
        for name, _, linear in quant_points(model):
            hooks.pre(linear, hook_for(name))
        model(ids.to(input_device(model)))
    return stats


@torch.no_grad()
def _block_outputs(model: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(output of every decoder block, logits) of one forward."""
    outputs: list[torch.Tensor] = []
    with Hooks() as hooks:
        for layer in decoder_layers(model):
            hooks.post(layer, lambda m, a, out: outputs.append(block_output(out)))
        logits = model(ids.to(input_device(model))).logits
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
        fp_logits = fp_model(ids.to(input_device(fp_model))).logits.to(logits.device)
    kl = float(next_token_kl(logits, fp_logits))
    per_block = [float(block_mse(out, ref)) for out, ref in zip(outputs, references, strict=True)]
    return kl, per_block


@dataclass
class Snapshot:
    """Bound/error/loss measurements at one moment (before or after learning)."""

    kl: float
    block_losses: list[float]
    calib: dict[str, dict[str, float]]
    heldout: dict[str, dict[str, float]]


def snapshot(
    model: nn.Module,
    fp_model: nn.Module,
    ids: torch.Tensor,
    heldout_ids: torch.Tensor | None,
    params: dict[str, nn.Parameter],
) -> Snapshot:
    was_training = model.training
    model.eval()
    try:
        kl, block_losses = _measure_losses(model, fp_model, ids)
        calib, heldout = _measure_points(model, ids, params), _measure_points(model, heldout_ids, params)
        return Snapshot(kl, block_losses, calib, heldout)
    finally:
        model.train(was_training)


def per_layer_rows(
    points: list[Point], before: Snapshot, after: Snapshot, seconds: dict[int, float]
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
