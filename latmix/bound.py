"""The MX error bound of DESIGN.md ("The bound") and the error it bounds.

For y = A x + b quantized blockwise, the error the next layer sees is e = A^-1 (Q(y) - y), so

    ||e|| <= ||A^-1||_2 * ||Q(y) - y||,   ||Q(y) - y||^2 <= sum_j k_j * (c_fmt * M_j + delta)^2

with M_j the max |y| of block j, k_j its size, c_fmt the per-format constant and delta the absolute
rounding step of a block whose scale sits at the format's smallest scale. Errors are reported as the
root mean square over tokens of the per-token L2 norm, so a bound and its error compare directly and
tightness = error / bound lies in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from latmix.formats import ELEMENT_FORMATS, MXFormat, get_format
from latmix.mx import quantize

E8M0_MIN_SCALE = 2.0**-127
E4M3 = ELEMENT_FORMATS["fp8_e4m3"]
# The smooth block max of the surrogate: ||v||_p >= max|v|, so the surrogate never undercuts the bound.
SURROGATE_P = 16.0


def format_constant(fmt: MXFormat | str) -> float:
    """c_fmt: the largest element error of a block relative to its max |y|.

    Power-of-two (E8M0) scales: the element table's constant, max(half a step in the top binade,
    saturation gap). A rounded E4M3 block scale (NVFP4) lands the block max within a factor
    (1 +- 2^-4) of max_normal, so the error is at most half a top-binade step of the scaled block,
    inflated by that factor: (2^(emax - m - 1) / max_normal) * (1 + 2^-(3 + 1)).
    """
    fmt = get_format(fmt)
    element = fmt.element
    if fmt.scale == "e8m0":
        return float(element.bound_constant)
    # NVFP4's block scale is clamped below at E4M3's min normal, never subnormal, so this holds above
    # that clamp; format_floor covers blocks below it.
    half_top_step = 2.0 ** (element.emax - element.mbits - 1)
    return half_top_step / element.max_normal * (1 + 2.0 ** -(E4M3.mbits + 1))


def format_floor(fmt: MXFormat | str, y: torch.Tensor) -> float:
    """delta: the absolute per-element error allowance of a block sitting at the smallest scale.

    E8M0: a block whose scale is clamped at 2^-127 rounds subnormal elements to steps of
    2^-127 * min_subnormal. NVFP4: a block whose scale is clamped at E4M3's min normal (2^-6, times the
    tensor scale amax / (6 * 448)) rounds with at most half a top-binade step of that scale.
    """
    fmt = get_format(fmt)
    element = fmt.element
    if fmt.scale == "e8m0":
        return E8M0_MIN_SCALE * float(element.min_subnormal)
    tensor_amax = float(y.detach().abs().max())
    tensor_scale = tensor_amax / (element.max_normal * E4M3.max_normal)
    if tensor_scale < torch.finfo(torch.float32).tiny:
        # A float32-subnormal tensor scale loses its precision (and its reciprocal overflows): NVFP4 is
        # degenerate there, and only the trivial |Q(v) - v| <= |Q(v)| + |v| <= 2 amax (+ one ulp) holds.
        return 2 * tensor_amax + element.max_normal * E4M3.max_normal * 2.0**-149
    return 2.0 ** (element.emax - element.mbits - 1) * E4M3.min_normal * tensor_scale


def _blocks(y: torch.Tensor, block_size: int) -> torch.Tensor:
    """y split into blocks along the last dim, zero-padded to whole blocks as the quantizer pads."""
    padding = -y.shape[-1] % block_size
    if padding:
        y = torch.nn.functional.pad(y, (0, padding))
    return y.reshape(*y.shape[:-1], -1, block_size)


def _block_size(fmt: MXFormat, block_size: int | None) -> int:
    return int(block_size) if block_size is not None else int(fmt.default_block_size)


def inverse_spectral_norm(A: torch.Tensor) -> torch.Tensor:
    """||A^-1||_2 = 1 / sigma_min(A), in float64 so ill-conditioned maps are not understated."""
    sigma = torch.linalg.svdvals(A.detach().to(torch.float64))
    return 1.0 / sigma.min()


def transformed(A: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """y = x @ A.T + b, in float32."""
    y = x.float() @ A.float().T
    return y if b is None else y + b.float()


def bound_of_transformed(
    y: torch.Tensor, inv_norm: torch.Tensor | float, fmt: MXFormat | str, block_size: int | None = None
) -> torch.Tensor:
    """The bound on the RMS (over tokens) of ||e|| given the quantized operand y and ||A^-1||_2."""
    fmt = get_format(fmt)
    k = _block_size(fmt, block_size)
    block_max = _blocks(y.detach().to(torch.float64), k).abs().amax(dim=-1)
    per_element = format_constant(fmt) * block_max + format_floor(fmt, y)
    per_token_sq = (k * per_element**2).sum(dim=-1)
    return torch.as_tensor(inv_norm, dtype=torch.float64) * per_token_sq.mean().sqrt()


def error_of_transformed(
    y: torch.Tensor,
    A_inv: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None,
    fmt: MXFormat | str,
    block_size: int | None = None,
    quantized: torch.Tensor | None = None,
) -> torch.Tensor:
    """The actual RMS (over tokens) of ||A^-1 (Q(y) - y)||.

    A_inv: the inverse matrix; or a function applying it to rows (a structured map's own inverse, in
    float32); or None where ||A^-1 e|| = ||e|| (no map, or an orthogonal one): then no product is computed.
    quantized: Q(y) when the caller already has it (the model's own operand), else it is computed here.
    """
    fmt = get_format(fmt)
    y32 = y.detach().float()
    q = quantize(y32, fmt, _block_size(fmt, block_size)) if quantized is None else quantized.detach().float()
    e = q - y32
    if callable(A_inv):
        with torch.no_grad():
            e = A_inv(e)
    e = e.to(torch.float64)
    if isinstance(A_inv, torch.Tensor):
        e = e @ A_inv.detach().to(torch.float64).T
    return e.pow(2).sum(dim=-1).mean().sqrt()


def mx_error_bound(
    A: torch.Tensor,
    b: torch.Tensor | None,
    x: torch.Tensor,
    fmt: MXFormat | str,
    block_size: int | None = None,
) -> torch.Tensor:
    """The bound for the transform (A, b) applied to activations x (rows), quantized in fmt."""
    return bound_of_transformed(transformed(A, b, x), inverse_spectral_norm(A), fmt, block_size)


def measure(
    A: torch.Tensor,
    b: torch.Tensor | None,
    x: torch.Tensor,
    fmt: MXFormat | str,
    block_size: int | None = None,
) -> dict[str, float]:
    """{bound, error, tightness} for the transform (A, b) on activations x."""
    y = transformed(A, b, x)
    A_inv = torch.linalg.inv(A.detach().to(torch.float64))
    bound = float(bound_of_transformed(y, inverse_spectral_norm(A), fmt, block_size))
    error = float(error_of_transformed(y, A_inv, fmt, block_size))
    return {"bound": bound, "error": error, "tightness": error / bound if bound > 0 else 0.0}


def bound_surrogate(
    y: torch.Tensor,
    A: torch.Tensor,
    fmt: MXFormat | str,
    block_size: int | None = None,
    p: float = SURROGATE_P,
) -> torch.Tensor:
    """A differentiable stand-in for the bound: block max -> block p-norm, ||A^-1||_2 -> 1/sigma_min(A).

    Both replacements are upper bounds of what they replace, so lowering the surrogate lowers a
    ceiling on the bound. Gradients flow to y and to A.
    """
    return quantization_error_surrogate(y, fmt, block_size, p) / smallest_singular_value(A)


def smallest_singular_value(A: torch.Tensor) -> torch.Tensor:
    """sigma_min(A) = 1 / ||A^-1||_2, differentiable in A."""
    return torch.linalg.svdvals(A.float()).min()


def quantization_error_surrogate(
    y: torch.Tensor, fmt: MXFormat | str, block_size: int | None = None, p: float = SURROGATE_P
) -> torch.Tensor:
    """The bound on ||Q(y) - y|| (RMS over tokens) with each block max replaced by the block p-norm."""
    fmt = get_format(fmt)
    k = _block_size(fmt, block_size)
    blocks = _blocks(y.float(), k)
    # Scale each block by its (detached) max first so the p-th power neither overflows nor underflows.
    peak = blocks.detach().abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    smooth_max = peak.squeeze(-1) * (blocks / peak).abs().pow(p).sum(dim=-1).pow(1.0 / p)
    per_token_sq = (k * (format_constant(fmt) * smooth_max) ** 2).sum(dim=-1)
    return per_token_sq.mean().sqrt()
