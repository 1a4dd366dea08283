"""A data-driven start for the learnable affine maps: SmoothQuant's per-channel scales (calib.smooth_alpha).

Each learnable affine map A at a per-block placement (pre_linear, attn_vo, down_proj) becomes
A diag(1/s), with, per input channel j of the map,

    s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)          (SmoothQuant)

x: the map's input over the calibration sequences in full precision; W: every weight that reads it,
in the same basis (the consumers' weights with the maps before this one folded in, and this one's
inverse not). log s is centered (mean 0) so log|det A| does not change (0 from an orthogonal start).
The readers fold the new A's inverse as before: the model's function is unchanged; what changes is how
the range is split between the quantized activation (x_j / s_j) and the weight (W_:,j s_j).

The scale goes into the map's own diagonal, exactly: with A = Q (R + D) per block (qr) or P L (U + D)
(lu), A diag(1/s) = Q (R diag(1/s) + D diag(1/s)), so the strictly upper factor's columns and the
log-diagonal take it. An svd map takes it while its right rotation is still the identity (before any
learning). A map with channel scales (A = B H D, FlatQuant's add_diag) takes it in D, whatever B is.
Other Kronecker maps and maps with a premix have no per-input-channel diagonal: they are left as they
are (and counted in the log line). Measured on explore (docs/calibration.md): alpha 0.5 as the
start of the latmix preset's block-diagonal maps, nothing learned, SmolLM2-135M W4A4 + GPTQ dev ppl
52.93 (block_hadamard 60.76).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from latmix.hooks import Hooks
from latmix.models import blocks
from latmix.quantize import PreparedModel, QuantLinear, quantization_disabled
from latmix.transforms import Affine, Headwise, Transform

__all__ = ["smooth_init", "smooth_log_scales"]

log = logging.getLogger(__name__)

# Ranges below this count as this (a channel that is always 0 still gets a finite scale).
EPS = 1e-8


def smooth_log_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """log s_j = alpha log max|x_j| - (1 - alpha) log max|W_:,j|, minus its mean (float32)."""
    log_s = alpha * x_max.float().clamp_min(EPS).log() - (1 - alpha) * w_max.float().clamp_min(EPS).log()
    return log_s - log_s.mean()


def _why_not(transform: Transform) -> str | None:
    """None if the map can take a per-input-channel scale exactly, else why not."""
    if not isinstance(transform, Affine) or not any(p.requires_grad for p in transform.parameters()):
        return "not a learnable affine map"
    if transform.channel_log_scale is not None:
        return None
    if transform.kronecker:
        return "kronecker"
    if transform.premix is not None:
        return "premix"
    factor = transform.factors[0]
    if factor.parametrization == "svd" and bool(factor.generator_right.detach().any()):
        return "svd with a learned right rotation"
    return None


@torch.no_grad()
def _scale_input(transform: Affine, log_s: torch.Tensor) -> None:
    """A <- A diag(exp(-log_s)), exactly, through the map's diagonal (see the module doc)."""
    if transform.channel_log_scale is not None:
        transform.channel_log_scale.sub_(log_s.to(transform.channel_log_scale))
        return
    factor = transform.factors[0]
    log_s = log_s.reshape(factor.log_scale.shape).to(factor.log_scale.device, factor.log_scale.dtype)
    if factor.parametrization in ("qr", "lu"):
        factor.upper.mul_(torch.exp(-log_s).unsqueeze(-2))  # column j of the strictly upper part / s_j
    factor.log_scale.sub_(log_s)


def _in_basis(linear: QuantLinear) -> torch.Tensor:
    """|W| in the basis of the linear's input before its own online maps: folded_in maps applied (float32)."""
    weight = linear.weight.detach().float()
    for transform in linear.folded_in:
        weight = transform.fold_into(weight)
    return weight.abs()


def _record(stats: dict[str, torch.Tensor], name: str, values: torch.Tensor, width: int) -> None:
    m = values.detach().float().abs().reshape(-1, width).amax(dim=0).cpu()
    stats[name] = m if name not in stats else torch.maximum(stats[name], m)


@torch.no_grad()
def smooth_init(prepared: PreparedModel, calib_ids: torch.Tensor, alpha: float, batch_size: int) -> list[str]:
    """Set the per-channel scales of the prepared model's learnable affine maps from activation and
    weight ranges (module doc); returns the names of the maps set. Logs one line saying how many."""
    model, adapter, transforms = prepared.model, prepared.adapter, prepared.transforms
    candidates = {
        name: t for name, t in transforms.items()
        if name.rsplit(".", 1)[-1] in ("pre_linear_attn", "pre_linear_mlp", "attn_vo", "down_proj")
    }
    reasons = {name: _why_not(t) for name, t in candidates.items()}
    eligible = {name for name, why in reasons.items() if why is None}
    stats: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    if eligible:
        with Hooks() as hooks:
            for index, layer in enumerate(adapter.layers()):
                with prepared.resident(layer):
                    weights.update(_watch_layer(hooks, stats, prepared, index, layer, eligible))
            with quantization_disabled(model):
                for start in range(0, calib_ids.shape[0], batch_size):
                    model(calib_ids[start : start + batch_size].to(blocks.input_device(model)), use_cache=False)
    done = []
    for name in sorted(eligible, key=list(transforms).index):
        if name in stats:
            _scale_input(transforms[name], smooth_log_scales(stats[name], weights[name], alpha))
            done.append(name)
    left = Counter(why for why in reasons.values() if why is not None)
    left_text = "".join(f"; {count} left as they are ({why})" for why, count in sorted(left.items()))
    log.info(
        "calib.smooth_alpha=%g: per-channel scales of %d learnable affine map(s) set from activation and "
        "weight ranges (SmoothQuant start, function unchanged)%s", alpha, len(done), left_text,
    )
    return done


def _watch_layer(
    hooks: Hooks, stats: dict[str, torch.Tensor], prepared: PreparedModel, index: int, layer: nn.Module,
    eligible: set[str],
) -> dict[str, torch.Tensor]:
    """Hooks that record, into `stats`, the input ranges of the layer's eligible maps; returns the
    weight ranges of what reads each map's output, per input channel."""
    adapter, weights = prepared.adapter, {}
    for side, readers in (("pre_linear_attn", adapter.attn_readers(layer)), ("pre_linear_mlp", adapter.mlp_readers(layer))):
        name = f"layers.{index}.{side}"
        if name in eligible:
            width = readers[0].in_features
            hooks.pre(readers[0], lambda m, a, n=name, w=width: _record(stats, n, a[0], w))
            weights[name] = torch.cat([_in_basis(r) for r in readers]).amax(dim=0).cpu()
    name = f"layers.{index}.down_proj"
    if name in eligible:
        down = adapter.mlp_writer(layer)
        hooks.pre(down, lambda m, a, n=name, w=down.in_features: _record(stats, n, a[0], w))
        weights[name] = _in_basis(down).amax(dim=0).cpu()
    name = f"layers.{index}.attn_vo"
    if name in eligible:
        vo = prepared.transforms[name]
        v, o = adapter.value_proj(layer), adapter.attn_writer(layer)
        # v's output has been through the map (per head): take it back to the map's input.
        head_map = next(t for t in v.out_map if isinstance(t, Headwise) and t.transform is vo)
        hooks.post(v, lambda m, a, out, n=name, t=head_map, d=vo.dim: _record(stats, n, t.inverse(out), d))
        # o reads v per head; its folded_in is this map's inverse alone (not applied here).
        o_abs = o.weight.detach().float().abs()
        weights[name] = o_abs.reshape(o.out_features, -1, vo.dim).amax(dim=(0, 1)).cpu()
    return weights
