"""GPTQ for MX weights: error feedback over input columns with the MX quantizer as the rounding.

As MR-GPTQ does (GPTQ with groupsize = MX block): before the columns of an MX block are quantized,
the block's shared scale is fixed from its current, error-updated weights; the columns are then
rounded one by one with that scale and each rounding error is spread over the columns not yet
quantized through the inverse Hessian. With act_order the blocks are visited in order of their
Hessian mass and the columns within a block likewise, so every MX block stays contiguous.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from latmix.formats import MXFormat, get_format
from latmix.hooks import Hooks
from latmix.models import block_inputs, decoder_layers, run_block
from latmix.mx import fixed_scale_rounder
from latmix.quantize import PreparedModel, QuantLinear, shared_operands
from latmix.settings import GPTQSettings, QuantConfig

# A rounder factory: given the current weights of one block (out, k), it fixes that block's scale
# and returns the function that rounds one column (out,) of the block with it.
ColumnRounder = Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]

DEFAULT_DAMP = GPTQSettings().damp
# Columns updated together before the trailing matrix is (GPTQ's lazy batch); a multiple of any MX block.
LAZY_BATCH = 128


def _damped_inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, GPTQ's numerically stable form."""
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(inverse, upper=True)


def _column_order(H: torch.Tensor, block_size: int, act_order: bool) -> torch.Tensor:
    n = H.shape[0]
    if not act_order:
        return torch.arange(n, device=H.device)
    diag = H.diagonal().reshape(n // block_size, block_size)
    block_order = diag.sum(dim=1).argsort(descending=True)
    within = diag.argsort(dim=1, descending=True)
    return (block_order[:, None] * block_size + within[block_order]).reshape(-1)


def gptq_quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    block_size: int,
    rounder: ColumnRounder,
    damp: float = DEFAULT_DAMP,
    act_order: bool = False,
) -> torch.Tensor:
    """Quantize W (out, in) against the input Hessian H = X^T X (in, in); returns the quantized W."""
    in_features = W.shape[1]
    if H.shape != (in_features, in_features):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match the weight's {in_features} inputs")
    if in_features % block_size:
        raise ValueError(f"in_features {in_features} is not divisible by block_size {block_size}")
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float32).clone()
    # An input that never fired carries no information: pin its Hessian and drop its weights.
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    order = _column_order(H, block_size, act_order) if act_order else None
    if order is not None:
        W, H = W[:, order], H[order][:, order]
    Hinv = _damped_inverse_cholesky(H, damp)
    Q = torch.zeros_like(W)
    lazy = max(LAZY_BATCH // block_size, 1) * block_size
    for start in range(0, in_features, lazy):
        stop = min(start + lazy, in_features)
        # The lazy batch transposed, (columns, out): each column is a contiguous row, so rounding and the
        # error update touch contiguous memory (the same arithmetic as on column slices, bit for bit).
        W1, Hinv1 = W[:, start:stop].T.contiguous(), Hinv[start:stop, start:stop]
        Q1, errors = torch.zeros_like(W1), torch.zeros_like(W1)
        round_column = None
        for i in range(stop - start):
            if i % block_size == 0:
                round_column = rounder(W1[i : i + block_size].T)
            Q1[i] = round_column(W1[i])
            errors[i] = (W1[i] - Q1[i]) / Hinv1[i, i]
            W1[i:] -= Hinv1[i, i:, None] * errors[i][None, :]
        Q[:, start:stop] = Q1.T
        W[:, stop:] -= errors.T @ Hinv[start:stop, stop:]
    return Q if order is None else Q[:, order.argsort()]


def mx_rounder(
    fmt: MXFormat | str, tensor_amax: torch.Tensor | float, clip_ratio: torch.Tensor | None = None
) -> ColumnRounder:
    """The MX quantizer as a GPTQ rounder: one shared scale per (row, block), fixed at block start.

    When a block starts, its per-row scale is computed once from the block's current (error-updated)
    row maxima, exactly as `latmix.mx.quantize` computes it (E8M0 power of two, or NVFP4's E4M3 block
    scale with the FP32 tensor scale of max(tensor_amax, the block's row maxima)); each column is then
    rounded elementwise with it (`mx.fixed_scale_rounder`), values that grew past their row's amax
    under error feedback clipped to it. tests/test_gptq.py holds it bit-identical to quantizing each
    value with the full quantizer in a two-element block beside its row's amax.

    clip_ratio (out,), a learned weight clipping ratio per row (`calib.learn_clipping`), scales each
    block's max before the scale is fixed and clips the row's values to it, as `mx.quantize` does with
    clip_ratio: with H = I the result is round-to-nearest with that clipping, bit for bit. For nvfp4,
    tensor_amax is then the clipped weight's max (`clipped_amax`).
    """
    fmt = get_format(fmt)

    def fix_block(block: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        block_amax = block.abs().amax(dim=1)
        if clip_ratio is not None:
            block_amax = clip_ratio * block_amax
        return fixed_scale_rounder(fmt, block_amax, tensor_amax)

    return fix_block


def clipped_amax(weight: torch.Tensor, clip_ratio: torch.Tensor | None) -> torch.Tensor:
    """The max magnitude of weight (out, in) after each row is clipped to clip_ratio (out,) of its max."""
    row_amax = weight.abs().amax(dim=1)
    return (row_amax if clip_ratio is None else clip_ratio * row_amax).max()


def row_clip_ratio(linear: QuantLinear) -> torch.Tensor | None:
    """The linear's learned weight clipping ratio per output row, or None when it learned none."""
    if linear.weight_clip is None:
        return None
    return linear.weight_clip.detach().to(torch.float32).reshape(linear.out_features)


class _HessianAccumulator:
    """Running H = 2/n X^T X of one operand, as the quantized model feeds it (GPTQ's add_batch)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.H = torch.zeros(in_features, in_features, device=device)
        self.rows = 0

    def add(self, X: torch.Tensor) -> None:
        X = X.reshape(-1, X.shape[-1]).float()
        total = self.rows + X.shape[0]
        self.H.mul_(self.rows / total).add_(X.T @ X, alpha=2.0 / total)
        self.rows = total


class _SharedHessians:
    """Forward pre-hooks that accumulate one Hessian per distinct operand of a block.

    Linears that read the same input tensor through the same online maps and activation quantizer
    (q/k/v; gate/up) have identical Hessians: the first computes it, the others share its accumulator.
    """

    def __init__(self) -> None:
        self.of: dict[int, _HessianAccumulator] = {}
        self._last: dict[tuple, tuple[torch.Tensor, _HessianAccumulator]] = {}

    def hook(self, module: QuantLinear, args: tuple) -> None:
        x, key = args[0], module.operand_key()
        last = self._last.get(key)
        if last is not None and last[0] is x:
            if self.of.setdefault(id(module), last[1]) is not last[1]:
                raise RuntimeError("GPTQ Hessian sharing: a linear changed the operand it shares between batches")
            return
        acc = self.of.get(id(module))
        if acc is None:
            acc = self.of[id(module)] = _HessianAccumulator(module.in_features, module.weight.device)
        acc.add(module.gemm_input(x))
        # Holding x keeps its id from being reused by a later tensor.
        self._last[key] = (x, acc)


@torch.no_grad()
def gptq_quantize_model(
    prepared: PreparedModel,
    calib_ids: torch.Tensor,
    quant_cfg: QuantConfig,
    settings: GPTQSettings | None = None,
    *,
    batch_size: int = 1,
) -> None:
    """GPTQ every weight-quantized linear of the decoder, block by block, and install the weights.

    Each block sees the outputs of the blocks already quantized before it; each linear's Hessian comes
    from its operand as the model quantizes it (online transforms applied, activations MX-quantized).
    Damping and column order are `settings`' (GPTQSettings() if None). Run after calibration (transforms folded); the
    weights go in through QuantLinear.set_weight.
    """
    if quant_cfg.weight_format is None:
        raise ValueError(
            "GPTQ needs quant.weight_format; with high-precision weights use weight_quantizer=rtn"
        )
    settings = settings or GPTQSettings()
    model = prepared.model.eval()
    hidden, kwargs = block_inputs(model, calib_ids)
    for block in tqdm(decoder_layers(model), desc="gptq", leave=False):
        with prepared.resident(block):
            _gptq_block(block, hidden, kwargs, batch_size, settings)
            with shared_operands():
                hidden = run_block(block, hidden, kwargs, batch_size)


def _gptq_block(
    block: nn.Module, hidden: torch.Tensor, kwargs: dict, batch_size: int, settings: GPTQSettings
) -> None:
    """GPTQ the weight-quantized linears of one block, from the Hessians of its inputs `hidden`.

    Linears that share a Hessian (q/k/v; gate/up) are solved as one weight, their rows stacked: GPTQ
    treats every row alike given the Hessian, so this is the per-linear result with a third (a half)
    of the column loop. Each linear keeps its own NVFP4 tensor scale (_stacked_rounder).
    """
    linears = [m for m in block.modules() if isinstance(m, QuantLinear) and m.weight_format is not None]
    hessians = _SharedHessians()
    with Hooks() as hooks, shared_operands():
        for linear in linears:
            hooks.pre(linear, hessians.hook)
        run_block(block, hidden, kwargs, batch_size)
    groups: dict[tuple, list[QuantLinear]] = {}
    for linear in linears:
        block_size = linear.weight_block_size or linear.weight_format.default_block_size
        groups.setdefault((id(hessians.of[id(linear)]), linear.weight_format.name, block_size), []).append(linear)
    for (_, _, block_size), group in groups.items():
        weights = [linear.effective_weight_and_bias()[0] for linear in group]
        rounder = _stacked_rounder(group[0].weight_format, weights, [row_clip_ratio(linear) for linear in group])
        H = hessians.of[id(group[0])].H
        stacked = gptq_quantize_weight(torch.cat(weights), H, block_size, rounder, settings.damp, settings.act_order)
        for linear, weight in zip(group, stacked.split([w.shape[0] for w in weights]), strict=True):
            linear.set_weight(weight)


def _stacked_rounder(
    fmt: MXFormat, weights: list[torch.Tensor], clip_ratios: list[torch.Tensor | None]
) -> ColumnRounder:
    """The MX rounder of weights stacked by rows, each row clipped by its linear's ratio if it has one:
    E8M0 scales are per row already; NVFP4 rounds each weight's rows with that weight's own FP32 tensor
    scale."""
    if not fmt.tensor_scale:
        return mx_rounder(fmt, 0.0, _stacked_ratios(weights, clip_ratios))
    sizes = [w.shape[0] for w in weights]
    parts = [mx_rounder(fmt, clipped_amax(w, r), r) for w, r in zip(weights, clip_ratios, strict=True)]

    def fix_block(block: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        rounders = [part(rows) for part, rows in zip(parts, block.split(sizes), strict=True)]
        return lambda column: torch.cat(
            [round_rows(rows) for round_rows, rows in zip(rounders, column.split(sizes), strict=True)]
        )

    return fix_block


def _stacked_ratios(weights: list[torch.Tensor], clip_ratios: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The stacked weights' clipping ratio per row (1 for a weight without one), or None if none has one."""
    if all(r is None for r in clip_ratios):
        return None
    return torch.cat([
        torch.ones(w.shape[0], device=w.device) if r is None else r for w, r in zip(weights, clip_ratios, strict=True)
    ])
