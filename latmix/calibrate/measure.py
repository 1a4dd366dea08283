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

from latmix.bound import bound_of_transformed, error_of_transformed, smallest_singular_value
from latmix.fidelity import next_token_kl
from latmix.hooks import Hooks
from latmix.losses import QuantizedOperand, block_mse
from latmix.models import block_output, decoder_layers, input_device
from latmix.quantize import QuantLinear
from latmix.transforms import Transform

__all__ = [
    "NonFiniteError",
    "Point",
    "Snapshot",
    "block_outputs",
    "captured_operands",
    "describe_parameters",
    "finite_guard",
    "per_layer_rows",
    "point_stats",
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
    # Linears behind the same chain (q/k/v, gate/up) share one sigma_min per forward.
    sigma_min: dict[tuple[int, ...], torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, args):
            if not module.quantize_acts:
                return
            y = module.transformed_input(args[0])
            key = _chain_key(module)
            if key not in sigma_min:
                sigma_min[key] = _smallest_singular_value(module).to(y.device)
            operands.append(QuantizedOperand(name, y, sigma_min[key], module.act_format, module.act_block_size))

        return hook

    with Hooks() as hooks:
        for name, _, linear in points:
            hooks.pre(linear, hook_for(name))
        yield operands


def _smallest_singular_value(linear: QuantLinear) -> torch.Tensor:
    """sigma_min of the map chain in front of a linear, differentiable: 1 for no map or orthogonal ones,
    from the map's structure for one map, from the dense composite for several."""
    chain = [*linear.folded_in, *linear.online_in]
    if all(t.orthogonal for t in chain):
        return torch.ones((), device=linear.weight.device)
    if len(chain) == 1:
        return chain[0].smallest_singular_value()
    return smallest_singular_value(_composite_matrix(linear))


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

# (||A^-1||_2, A^-1 as a matrix, a function or None, condition number) of a map chain
Inverse = tuple[float, Any, float]


def _inverse_and_conditioning(linear: QuantLinear) -> Inverse:
    """(||A^-1||_2, A^-1, condition number) of the map chain in front of a linear.

    No map, or only orthogonal ones: (1, None, 1), since ||A^-1 e|| = ||e|| needs no product. One map:
    its singular values from its structure (blocks, Kronecker factors, heads) and A^-1 applied as the
    map applies it, never a dense inverse. Several: the composite matrix, inverted in float64.
    """
    chain = [*linear.folded_in, *linear.online_in]
    if all(t.orthogonal for t in chain):
        return 1.0, None, 1.0
    if len(chain) == 1:
        sigma = chain[0].singular_values()
        return float(1.0 / sigma.min()), chain[0].apply_inverse_matrix, float(sigma.max() / sigma.min())
    A = _composite_matrix(linear).detach().double()
    sigma = torch.linalg.svdvals(A)
    return float(1.0 / sigma.min()), torch.linalg.inv(A), float(sigma.max() / sigma.min())


class _PointStats:
    """Forward pre-hooks that measure bound, actual error and condition number at every quantized point.

    Linears that quantize one input tensor through one map chain and format (q/k/v; gate/up) are
    measured once and share the numbers; each chain's inverse is computed once.
    """

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        self.params = params
        self.stats: dict[str, dict[str, float]] = {}
        self._inverses: dict[tuple[int, ...], Inverse] = {}
        self._last: dict[tuple, tuple[torch.Tensor, dict[str, float]]] = {}

    def hook_for(self, name: str):
        def hook(module: QuantLinear, args: tuple) -> None:
            if module.quantize_acts:
                self.stats[name] = self._measure(name, module, args[0])

        return hook

    def _measure(self, name: str, module: QuantLinear, x: torch.Tensor) -> dict[str, float]:
        chain = _chain_key(module)
        key = (chain, module.act_format.name, module.act_block_size)
        last = self._last.get(key)
        if last is not None and last[0] is x:
            return last[1]
        y, q = module.measured_operand(x)
        y = y.float().reshape(-1, module.in_features)
        if not torch.isfinite(y).all():
            raise NonFiniteError(
                f"non-finite activation at the quantized input of {name}; {describe_parameters(self.params)}"
            )
        if chain not in self._inverses:
            self._inverses[chain] = _inverse_and_conditioning(module)
        inv_norm, A_inv, cond = self._inverses[chain]
        stats = {
            "bound": float(bound_of_transformed(y, inv_norm, module.act_format, module.act_block_size)),
            "error": float(error_of_transformed(
                y, A_inv, module.act_format, module.act_block_size, quantized=_unclipped(module, q, y.shape)
            )),
            "cond": cond,
        }
        # Holding x keeps its id from being reused by a later tensor.
        self._last[key] = (x, stats)
        return stats


def _unclipped(module: QuantLinear, q: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """The model's own Q(y) where it is the plain MX quantization the bound is about; None (quantize again,
    unclipped) where learned clipping ratios or a low-precision operand make it differ."""
    if module.act_clip is not None or q.dtype != torch.float32:
        return None
    return q.reshape(shape)


@contextlib.contextmanager
def point_stats(model: nn.Module, params: dict[str, nn.Parameter]) -> Iterator[dict[str, dict[str, float]]]:
    """Bound, actual error and condition number of every activation-quantized point, filled in by the
    forwards run inside the block (the last forward's numbers)."""
    measured = _PointStats(params)
    with Hooks() as hooks:
        for name, _, linear in quant_points(model):
            hooks.pre(linear, measured.hook_for(name))
        yield measured.stats


@torch.no_grad()
def block_outputs(model: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(output of every decoder block, logits) of one forward: of the full-precision model, what
    snapshot measures against."""
    outputs: list[torch.Tensor] = []
    with Hooks() as hooks:
        for layer in decoder_layers(model):
            hooks.post(layer, lambda m, a, out: outputs.append(block_output(out)))
        logits = model(ids.to(input_device(model))).logits
    return outputs, logits


@dataclass
class Snapshot:
    """Bound/error/loss measurements at one moment (before or after learning)."""

    kl: float
    block_losses: list[float]
    calib: dict[str, dict[str, float]]
    heldout: dict[str, dict[str, float]]


@torch.no_grad()
def snapshot(
    model: nn.Module,
    reference: tuple[list[torch.Tensor], torch.Tensor],
    residual: Transform | None,
    ids: torch.Tensor,
    heldout_ids: torch.Tensor | None,
    params: dict[str, nn.Parameter],
) -> Snapshot:
    """The KL to the full-precision model, the normalized MSE of every block's output to the full-precision
    block's, and the bound/error of every point, on ids (all from one quantized forward) and on heldout_ids.

    reference: the full-precision model's block outputs and logits on ids (block_outputs), taken once for
    every snapshot. Its block outputs are mapped by the residual map T1 (as it stands) into the model's
    basis, as layer-wise calibration maps its targets; so a non-orthogonal T1's own deviation counts too.
    """
    was_training = model.training
    model.eval()
    try:
        with point_stats(model, params) as calib:
            outputs, logits = block_outputs(model, ids)
        heldout: dict[str, dict[str, float]] = {}
        if heldout_ids is not None:
            with point_stats(model, params) as heldout:
                model(heldout_ids.to(input_device(model)))
        fp_outputs, fp_logits = reference
        kl = float(next_token_kl(logits, fp_logits.to(logits.device)))
        block_losses = [
            float(block_mse(out, _in_model_basis(ref.to(out.device), residual)))
            for out, ref in zip(outputs, fp_outputs, strict=True)
        ]
        return Snapshot(kl, block_losses, calib, heldout)
    finally:
        model.train(was_training)


def _in_model_basis(hidden: torch.Tensor, residual: Transform | None) -> torch.Tensor:
    return hidden if residual is None else residual(hidden)


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
