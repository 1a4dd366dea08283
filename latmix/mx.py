"""Exact MX fake quantization (OCP Microscaling Formats v1.0) of the formats in `latmix.formats`.

`quantize(x, fmt)` returns what a tensor becomes after an MX quantize + dequantize round trip, in x's
shape and dtype, with a straight-through gradient so it can sit inside a graph being optimized.

Semantics (OCP MX v1.0, section 6.3), per block of `block_size` consecutive elements along `dim`:

- shared scale X = 2^(floor(log2(amax)) - emax_elem), the exponent clamped to E8M0's [-127, 127];
  floor(log2) is read from the float32 exponent bits, so it is exact (float32 torch.log2, which
  microxcaling uses, rounds 2^k - ulp up to k for large k);
- each element v/X is rounded to the element format with round-half-to-even, subnormals included,
  and saturated to +-max_normal (also for FP8 E5M2, whose Inf is never produced);
- an all-zero block stays zero, -0.0 stays -0.0;
- a block holding NaN or +-Inf becomes all NaN: its scale is the E8M0 NaN (log2 of Inf is out of
  E8M0's range). This matches the OCP reference (microsoft/microxcaling); torchao (0.18, FLOOR)
  instead keeps the Inf and flushes the rest of its block to zero;
- mxint8: 2's-complement int8 elements with implicit scale 2^-6, i.e. k/64 for k in [-127, 127]
  (emax_elem = 0), saturating symmetrically as the spec prescribes;
- a `dim` length that is not a multiple of `block_size` is zero-padded to whole blocks (zeros never
  change a block's max) and cropped back.

nvfp4 (NVIDIA's FP4: E2M1 elements, blocks of 16, FP8 E4M3 block scale, FP32 tensor scale) follows
torchao's `nvfp4_quantize` with `per_tensor_scale = amax(|x|) / (6 * 448)` bit for bit: block scale =
E4M3-round(clamp(amax_block / 6 / tensor_scale, min=2^-6)), elements = E2M1-round(v * ((1 / tensor_scale)
/ block_scale)) (a reciprocal multiply, as NVIDIA's kernels do), dequantized as q * (tensor_scale *
block_scale). An all-zero tensor stays zero; a NaN or Inf anywhere makes the FP32 tensor scale
non-finite, so the whole tensor becomes NaN.

Gradient: plain straight-through (identity), also through saturated elements, so that the blocks'
largest values, which saturate most, keep a gradient telling a learned transform to shrink them.
With `clip_ratio`, the clamp to +-ratio * block_amax is an ordinary differentiable op before the
straight-through quantizer, so the gradient is zero for clipped elements and flows to the ratio.

All arithmetic is float32 whatever the input dtype (float64 input is rounded to float32 first); scaling
is by exact powers of two built from exponent bits, so every step but the element rounding is exact
and the result is bit-exact. MX results of bf16/fp16 inputs are exactly representable in that dtype.

Speed: `_fake_quantize_blocks` is the readable eager reference. For tensors of at least
`FUSED_MIN_NUMEL` elements it is run through `torch.compile` (one kernel instead of a dozen passes),
compiled lazily per (format, dtype, device type). Set LATMIX_MX_COMPILE=0 to stay eager; if
compilation fails, quantize warns once and stays eager for that key.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from latmix.formats import ELEMENT_FORMATS, ElementFormat, MXFormat, get_format

__all__ = ["fixed_scale_rounder", "quantize", "with_rounding_noise"]

# E8M0 encodes 2^-127 .. 2^127; its one remaining code, 0xFF, is NaN.
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127

_F32_MANTISSA_BITS = 23
_F32_EXP_BIAS = 127
_F32_EXPONENT_MASK = 0x7F800000

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Below this many elements quantize stays eager: a compile costs seconds once, while eager takes a few
# milliseconds here, so unit tests and tiny models never wait for one.
FUSED_MIN_NUMEL = 1 << 20


# ---------------------------------------------------------------------------------------------------
# Exact float32 building blocks


def _floor_log2(magnitude: Tensor) -> Tensor:
    """floor(log2(m)) for float32 m >= 0, exactly, from the exponent bits (int32).

    Zero and float32 subnormals give -127; every caller clamps to an exponent at or above that.
    """
    biased = (magnitude.view(torch.int32) >> _F32_MANTISSA_BITS) & 0xFF
    return biased - _F32_EXP_BIAS


def _exp2(exponent: Tensor) -> Tensor:
    """2^e as float32 for int32 e in [-127, 127], exactly (2^-127 is the subnormal 0x00400000)."""
    normal = (exponent + _F32_EXP_BIAS) << _F32_MANTISSA_BITS
    bits = torch.where(exponent > -_F32_EXP_BIAS, normal, 1 << (_F32_MANTISSA_BITS - 1))
    return bits.view(torch.float32)


def _round_to_element(values: Tensor, element: ElementFormat) -> Tensor:
    """Round float32 values to the nearest element value (ties to even), saturating at max_normal.

    The classic magic-number rounding: adding C = 2^(23 + step exponent) to |v| lands the sum in the
    float32 binade whose spacing is exactly the element step of |v|'s binade (the subnormal step below
    min_normal), so the float32 addition itself rounds half to even, and subtracting C is exact.
    C is built from |v|'s exponent bits; capping them at the top binade keeps Inf/NaN from overflowing
    int32 (those saturate or stay NaN either way). NaN stays NaN.
    """
    magnitude = values.abs()
    smallest_binade = (element.emin + _F32_EXP_BIAS) << _F32_MANTISSA_BITS
    largest_binade = (element.emax + _F32_EXP_BIAS) << _F32_MANTISSA_BITS
    binade = (magnitude.view(torch.int32) & _F32_EXPONENT_MASK).clamp(smallest_binade, largest_binade)
    magic = (binade + ((_F32_MANTISSA_BITS - element.mbits) << _F32_MANTISSA_BITS)).view(torch.float32)
    rounded = (magnitude + magic) - magic
    return torch.copysign(rounded.clamp(max=element.max_normal), values)


def _e8m0_exponent(block_amax: Tensor, element: ElementFormat) -> Tensor:
    """The shared E8M0 exponent floor(log2(amax)) - emax_elem of blocks whose max magnitude is block_amax."""
    return (_floor_log2(block_amax) - element.emax).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)


def _round_e8m0(values: Tensor, finite: Tensor, down: Tensor, up: Tensor, element: ElementFormat) -> Tensor:
    """Round values with given E8M0 scales, down = 2^-e and up = 2^e (broadcast); NaN where not finite."""
    dequantized = _round_to_element(values * down, element) * up
    return torch.where(finite, dequantized, math.nan)


def _fake_quantize_e8m0(blocks: Tensor, element: ElementFormat) -> Tensor:
    """OCP MX: one power-of-two scale per block (last dim) from the block's max magnitude."""
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    shared_exponent = _e8m0_exponent(block_amax, element)
    return _round_e8m0(blocks, block_amax.isfinite(), _exp2(-shared_exponent), _exp2(shared_exponent), element)


def _nvfp4_scales(tensor_amax: Tensor, block_amax: Tensor, element: ElementFormat) -> tuple[Tensor, Tensor]:
    """(FP32 tensor scale, E4M3 block scale) of NVFP4 from the tensor's and the blocks' max magnitudes."""
    scale_element = ELEMENT_FORMATS["fp8_e4m3"]
    tensor_scale = tensor_amax / (element.max_normal * scale_element.max_normal)
    # An all-zero tensor has a zero tensor scale; any positive one keeps its zeros zero.
    tensor_scale = torch.where(tensor_amax > 0, tensor_scale, 1.0)
    wanted_block_scale = (block_amax / element.max_normal / tensor_scale).clamp(min=scale_element.min_normal)
    return tensor_scale, _round_to_element(wanted_block_scale, scale_element)


def _round_nvfp4(
    values: Tensor, tensor_amax: Tensor, tensor_scale: Tensor, block_scale: Tensor, element: ElementFormat
) -> Tensor:
    """Round values with given NVFP4 scales (block_scale broadcast against them)."""
    scaled = values * ((1.0 / tensor_scale) / block_scale)
    dequantized = _round_to_element(scaled, element) * (tensor_scale * block_scale)
    return torch.where(tensor_amax.isfinite(), dequantized, math.nan)


def _fake_quantize_nvfp4(blocks: Tensor, element: ElementFormat, tensor_amax: Tensor | None = None) -> Tensor:
    """NVFP4 as torchao's nvfp4_quantize with per_tensor_scale = amax / (elem max * E4M3 max).

    tensor_amax, the whole tensor's max magnitude in float32, is taken from blocks unless given."""
    if tensor_amax is None:
        tensor_amax = blocks.abs().amax()
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    tensor_scale, block_scale = _nvfp4_scales(tensor_amax, block_amax, element)
    return _round_nvfp4(blocks, tensor_amax, tensor_scale, block_scale, element)


def _fake_quantize_blocks(blocks: Tensor, fmt: MXFormat, tensor_amax: Tensor | None = None) -> Tensor:
    """The eager reference: fake-quantize `blocks` (..., block_size) in float32, return blocks' dtype.

    tensor_amax: for NVFP4, the whole tensor's max magnitude when the caller has taken it."""
    blocks32 = blocks.to(torch.float32)
    if fmt.tensor_scale:
        return _fake_quantize_nvfp4(blocks32, fmt.element, tensor_amax).to(blocks.dtype)
    return _fake_quantize_e8m0(blocks32, fmt.element).to(blocks.dtype)


# ---------------------------------------------------------------------------------------------------
# The fused (compiled) path


# Graphs are specialized to the format (its constants are baked into the kernel) and the block size;
# only the number of blocks is dynamic. All keys' wrappers run one code object, on which dynamo caches
# graphs (8 by default), so the limit leaves room for every (format, dtype, device, block size), and
# automatic dynamic shapes stay off: they would turn format constants that differ between two
# compiles (mbits, emax) into runtime inputs of one generic graph.
_DYNAMO_SETTINGS = {"recompile_limit": 128, "automatic_dynamic_shapes": False}
_compiled: dict[tuple[str, torch.dtype, str], Callable[[Tensor], Tensor]] = {}
_compile_failed: set[tuple[str, torch.dtype, str]] = set()


def _compile_enabled() -> bool:
    return os.environ.get("LATMIX_MX_COMPILE", "1") != "0"


def _fused_fake_quantize_blocks(blocks: Tensor, fmt: MXFormat) -> Tensor:
    """`_fake_quantize_blocks` through torch.compile, compiled on first use per key; eager on failure."""
    key = (fmt.name, blocks.dtype, blocks.device.type)
    if key in _compile_failed:
        return _fake_quantize_blocks(blocks, fmt)
    if key not in _compiled:
        _compiled[key] = torch.compile(functools.partial(_fake_quantize_blocks, fmt=fmt))
    rows = blocks.reshape(-1, blocks.shape[-1])
    torch._dynamo.maybe_mark_dynamic(rows, 0)
    # NVFP4's whole-tensor max is taken outside the graph: compiled into it, on an H200, 16384 x 16384
    # float32 took 28 ms (48x a copy) against 1.3 ms in bfloat16. Rounding to float32 is monotone, so
    # the max of the input's magnitudes, rounded, is the max of the rounded magnitudes: same bits.
    tensor_amax = rows.abs().amax().to(torch.float32) if fmt.tensor_scale else None
    try:
        with torch._dynamo.config.patch(**_DYNAMO_SETTINGS):
            return _compiled[key](rows, tensor_amax=tensor_amax).reshape(blocks.shape)
    except Exception as error:  # any compiler failure: the eager reference computes the same values
        _compile_failed.add(key)
        warnings.warn(
            f"latmix.mx: torch.compile failed for {key} ({type(error).__name__}: {error}); "
            "using the eager quantizer for it from now on (set LATMIX_MX_COMPILE=0 to skip compiling)",
            RuntimeWarning,
            stacklevel=2,
        )
        return _fake_quantize_blocks(blocks, fmt)


def _quantize_blocks(blocks: Tensor, fmt: MXFormat) -> Tensor:
    use_fused = _compile_enabled() and blocks.numel() >= FUSED_MIN_NUMEL and not torch.compiler.is_compiling()
    return _fused_fake_quantize_blocks(blocks, fmt) if use_fused else _fake_quantize_blocks(blocks, fmt)


class _StraightThroughQuantize(torch.autograd.Function):
    """Forward: fake quantization. Backward: identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, blocks: Tensor, fmt: MXFormat) -> Tensor:
        return _quantize_blocks(blocks, fmt)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output, None


# ---------------------------------------------------------------------------------------------------
# Public entry point


def _check_arguments(x: Tensor, fmt: MXFormat, block_size: int, dim: int) -> None:
    if not isinstance(x, Tensor) or x.dtype not in SUPPORTED_DTYPES:
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        names = ", ".join(str(dtype).removeprefix("torch.") for dtype in SUPPORTED_DTYPES)
        raise ValueError(f"quantize needs a floating tensor ({names}); got {got}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(
            f"block_size must be a positive int (or None for the format's default, "
            f"{fmt.default_block_size} for {fmt.name}); got {block_size!r}"
        )
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"dim must index one of x's {x.dim()} dimensions (shape {tuple(x.shape)}); got {dim}"
        )


def _clip_to_ratio(blocks: Tensor, clip_ratio: float | Tensor) -> Tensor:
    """Clamp each block to +-ratio * its max magnitude (FlatQuant's learnable clipping)."""
    if not isinstance(clip_ratio, Tensor) and not clip_ratio > 0:
        raise ValueError(f"clip_ratio must be positive (1.0 clips nothing); got {clip_ratio!r}")
    bound = clip_ratio * blocks.abs().amax(dim=-1, keepdim=True)
    return torch.minimum(torch.maximum(blocks, -bound), bound)


def _blockwise(
    x: Tensor,
    fmt: str | MXFormat,
    block_size: int | None,
    dim: int,
    clip_ratio: float | Tensor | None,
    per_blocks: Callable[[Tensor, MXFormat], Tensor],
) -> Tensor:
    """per_blocks applied to x cut into blocks along `dim` (zero-padded, clipped if asked), in x's shape."""
    mx_format = get_format(fmt)
    block = mx_format.default_block_size if block_size is None else block_size
    _check_arguments(x, mx_format, block, dim)
    if x.numel() == 0:
        return x.clone()

    along_last = x.movedim(dim, -1)
    length = along_last.shape[-1]
    padding = -length % block
    if padding:
        along_last = torch.nn.functional.pad(along_last, (0, padding))
    blocks = along_last.reshape(*along_last.shape[:-1], -1, block)
    if clip_ratio is not None:
        blocks = _clip_to_ratio(blocks.to(torch.float32), clip_ratio)

    result = per_blocks(blocks, mx_format)
    return result.reshape(along_last.shape)[..., :length].movedim(-1, dim).to(x.dtype)


def quantize(
    x: Tensor,
    fmt: str | MXFormat,
    block_size: int | None = None,
    dim: int = -1,
    *,
    clip_ratio: float | Tensor | None = None,
) -> Tensor:
    """Fake-quantize x to an MX format along `dim`: quantize, dequantize, same shape and dtype.

    block_size None means the format's own (32 for MX, 16 for nvfp4). The gradient is
    straight-through. clip_ratio (a float, or a tensor broadcastable to the per-block max of shape
    (*x.shape without dim, n_blocks, 1)) clamps each block to +-ratio * its max magnitude before the
    scale is computed; the gradient flows to a tensor ratio. See the module docstring for the exact
    semantics.
    """
    return _blockwise(x, fmt, block_size, dim, clip_ratio, _StraightThroughQuantize.apply)


def _block_scales(block_amax: Tensor, fmt: MXFormat) -> Tensor:
    """What `quantize` divides each element of blocks whose max magnitudes are block_amax (float32) by:
    the E8M0 block scale, or for nvfp4 the FP32 tensor scale times the E4M3 block scale."""
    if fmt.tensor_scale:
        tensor_scale, block_scale = _nvfp4_scales(block_amax.amax(), block_amax, fmt.element)
        return tensor_scale * block_scale
    return _exp2(_e8m0_exponent(block_amax, fmt.element))


def _element_steps(scaled: Tensor, element: ElementFormat) -> Tensor:
    """The spacing of the element grid at each |value| (in element units): 2^(binade - mbits), the
    subnormal spacing below min_normal, the top binade's spacing above max_normal."""
    binade = _floor_log2(scaled.abs()).clamp(element.emin, element.emax)
    return _exp2(binade - element.mbits)


def _rounding_noise_blocks(blocks: Tensor, fmt: MXFormat) -> Tensor:
    """blocks + u * step, u ~ U(-1/2, 1/2) per element, step the grid spacing `quantize` rounds each
    element to; elements beyond max_normal take their saturated value instead (straight-through, as in
    `quantize`). The step is scaled by amax / amax (1 in value), so the gradient also reaches each
    block's largest element: a larger block max means a coarser grid for the whole block, which round to
    nearest's straight-through gradient never says. nvfp4 scales each block so that its max lands on
    (about) the top code, where it is hardly rounded: there the max gets no noise."""
    blocks32 = blocks.to(torch.float32)
    block_amax = blocks32.abs().amax(dim=-1, keepdim=True)
    with torch.no_grad():
        scales = _block_scales(block_amax.detach(), fmt)
        scaled = blocks32 / scales
        steps = _element_steps(scaled, fmt.element) * scales
        saturated = scaled.abs() > fmt.element.max_normal
        if fmt.tensor_scale:
            saturated |= blocks32.abs() == block_amax
        steps = torch.where(saturated, 0.0, steps)
        saturation = torch.where(saturated, scaled.clamp(-fmt.element.max_normal, fmt.element.max_normal) * scales - blocks32, 0.0)
    coarsening = block_amax / block_amax.detach().clamp(min=torch.finfo(torch.float32).tiny)
    noise = (torch.rand_like(blocks32) - 0.5) * steps * coarsening
    return (blocks32 + saturation + noise).to(blocks.dtype)


def with_rounding_noise(
    x: Tensor,
    fmt: str | MXFormat,
    block_size: int | None = None,
    dim: int = -1,
    *,
    clip_ratio: float | Tensor | None = None,
) -> Tensor:
    """x plus uniform noise as wide as the rounding step `quantize` would apply to each element: a
    stand-in for the quantizer while learning (pseudo-quantization noise, as DiffQ trains with).

    Round to nearest is piecewise constant in its input, so the loss of a model quantized by it jumps
    whenever a rounding flips, and its straight-through gradient ignores the block scale. With noise
    nothing flips (only a value crossing into another binade changes its noise's width), and the
    gradient reaches each block's max as well as x. The noise
    has the error variance of round to nearest (step^2 / 12 for uniformly placed values), and values
    beyond the largest code saturate as they do there. Drawn from torch's global generator. Arguments
    as `quantize`.
    """
    return _blockwise(x, fmt, block_size, dim, clip_ratio, _rounding_noise_blocks)


def fixed_scale_rounder(
    fmt: str | MXFormat, block_amax: Tensor, tensor_amax: Tensor | float | None = None
) -> Callable[[Tensor], Tensor]:
    """Round values elementwise with scales fixed once, as `quantize` sets them for blocks of that max.

    block_amax (any shape) holds the max magnitude of each value's block; the returned function takes
    values of that shape, clips them to +-block_amax and rounds them exactly as `quantize` rounds an
    element of a block whose max magnitude is block_amax (for nvfp4: of a tensor whose max magnitude is
    max(tensor_amax, block_amax.max())). This is GPTQ's rounding: a block's scale is fixed when the block
    starts and its columns are then rounded one at a time. Eager float32, no gradient.
    """
    fmt = get_format(fmt)
    element = fmt.element
    amax = block_amax.detach().to(torch.float32)
    if fmt.tensor_scale:
        base = torch.as_tensor(
            0.0 if tensor_amax is None else float(tensor_amax), dtype=torch.float32, device=amax.device
        )
        whole = torch.maximum(base, amax.max()) if amax.numel() else base
        tensor_scale, block_scale = _nvfp4_scales(whole, amax, element)

        def round_values(values: Tensor) -> Tensor:
            return _round_nvfp4(_clip(values, amax), whole, tensor_scale, block_scale, element).to(values.dtype)

        return round_values
    exponent = _e8m0_exponent(amax, element)
    finite, down, up = amax.isfinite(), _exp2(-exponent), _exp2(exponent)

    def round_values(values: Tensor) -> Tensor:
        return _round_e8m0(_clip(values, amax), finite, down, up, element).to(values.dtype)

    return round_values


def _clip(values: Tensor, amax: Tensor) -> Tensor:
    """values in float32, clamped to +-amax (values that grew past their block's max under error feedback)."""
    return torch.maximum(torch.minimum(values.to(torch.float32), amax), -amax)
