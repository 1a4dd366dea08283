"""latmix.mx against the OCP Microscaling Formats v1.0 specification.

The oracle here is independent of the implementation: element values are decoded from their bit codes
with the spec's biases, and a block is quantized by brute force, in exact rational arithmetic, to the
nearest element value (ties to the even code), after computing the shared E8M0 scale with math.frexp.
"""

from __future__ import annotations

import bisect
import itertools
import math
import warnings
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import latmix.mx as mx
from latmix.formats import ELEMENT_FORMATS, FORMATS, ElementFormat, MXFormat, get_format
from latmix.mx import quantize

MX_FORMATS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8"]

# The spec's tables (OCP MX v1.0, sections 5.3 and 5.4): exponent bias, emax, max normal, min normal,
# min subnormal, total bits. Typed in from the document, not derived. The spec gives INT8 only as
# k/64 values; its min_normal 1.0 here is latmix's convention (a single binade, exponent 0).
PUBLISHED = {
    "fp8_e4m3": dict(bias=7, emax=8, max_normal=448.0, min_normal=2.0**-6, min_subnormal=2.0**-9, bits=8),
    "fp8_e5m2": dict(
        bias=15, emax=15, max_normal=57344.0, min_normal=2.0**-14, min_subnormal=2.0**-16, bits=8
    ),
    "fp6_e3m2": dict(bias=3, emax=4, max_normal=28.0, min_normal=0.25, min_subnormal=0.0625, bits=6),
    "fp6_e2m3": dict(bias=1, emax=2, max_normal=7.5, min_normal=1.0, min_subnormal=0.125, bits=6),
    "fp4_e2m1": dict(bias=1, emax=2, max_normal=6.0, min_normal=1.0, min_subnormal=0.5, bits=4),
    "int8": dict(bias=0, emax=0, max_normal=127 / 64, min_normal=1.0, min_subnormal=1 / 64, bits=8),
}
# DESIGN.md "The bound".
BOUND_CONSTANTS = {
    "fp4_e2m1": 0.5,
    "fp6_e2m3": 0.125,
    "fp6_e3m2": 0.25,
    "fp8_e4m3": 0.25,
    "fp8_e5m2": 0.25,
    "int8": 1 / 64,
}


# ---------------------------------------------------------------------------------------------------
# The independent oracle


def decode_codes(element: ElementFormat) -> list[tuple[Fraction, int]]:
    """(value, code) for every non-negative finite code, decoded with the spec's bias."""
    if element.is_int:
        return [(Fraction(k, 64), k) for k in range(128)]
    bias = PUBLISHED[element.name]["bias"]
    top_field = 2**element.ebits - 1
    decoded = []
    for code in range(2 ** (element.ebits + element.mbits)):
        exponent_field, mantissa = divmod(code, 2**element.mbits)
        if element.name == "fp8_e5m2" and exponent_field == top_field:
            continue  # Inf and NaN
        if element.name == "fp8_e4m3" and exponent_field == top_field and mantissa == 2**element.mbits - 1:
            continue  # S.1111.111 is NaN
        if exponent_field == 0:
            value = Fraction(mantissa, 2**element.mbits) * Fraction(2) ** (1 - bias)
        else:
            value = (1 + Fraction(mantissa, 2**element.mbits)) * Fraction(2) ** (exponent_field - bias)
        decoded.append((value, code))
    return sorted(decoded)


GRIDS = {name: decode_codes(element) for name, element in ELEMENT_FORMATS.items()}


def round_to_grid(magnitude: Fraction, grid: list[tuple[Fraction, int]]) -> Fraction:
    """Nearest grid value, ties to the even code; beyond the largest value, the largest (saturation)."""
    values = [value for value, _ in grid]
    above = bisect.bisect_left(values, magnitude)
    if above == len(values):
        return values[-1]
    if values[above] == magnitude or above == 0:
        return values[above]
    (low, low_code), (high, _) = grid[above - 1], grid[above]
    if magnitude - low != high - magnitude:
        return low if magnitude - low < high - magnitude else high
    return low if low_code % 2 == 0 else high


def oracle_block(values: list[float], element: ElementFormat) -> list[float]:
    """One MX block by the spec: X = 2^(floor(log2 amax) - emax) clamped to E8M0, elements to grid."""
    if not all(math.isfinite(v) for v in values):
        return [math.nan] * len(values)
    amax = max(abs(v) for v in values)
    if amax == 0:
        return [math.copysign(0.0, v) for v in values]
    floor_log2 = math.frexp(amax)[1] - 1
    scale = Fraction(2) ** min(max(floor_log2 - PUBLISHED[element.name]["emax"], -127), 127)
    return [
        math.copysign(float(round_to_grid(abs(Fraction(v)) / scale, GRIDS[element.name]) * scale), v)
        for v in values
    ]


def oracle(x: torch.Tensor, fmt: str, block_size: int = 32) -> torch.Tensor:
    rows = x.to(torch.float64).reshape(-1, block_size).tolist()
    element = get_format(fmt).element
    return torch.tensor([oracle_block(row, element) for row in rows], dtype=torch.float32).reshape(x.shape)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, NaN at the same places, identical bits (so the sign of zero) everywhere else."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = actual.isnan()
    assert torch.equal(nan, expected.isnan()), "NaN in different places"
    int_type = {4: torch.int32, 2: torch.int16}[actual.element_size()]
    differ = (actual.view(int_type) != expected.view(int_type)) & ~nan
    assert not differ.any(), (
        f"{int(differ.sum())} elements differ, e.g. {actual[differ][:5].tolist()} vs {expected[differ][:5].tolist()}"
    )


def grid_tensor(fmt: str) -> torch.Tensor:
    return torch.tensor([float(value) for value, _ in GRIDS[get_format(fmt).element.name]])


# ---------------------------------------------------------------------------------------------------
# The format table


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_element_format_matches_the_published_table(name):
    element, published = ELEMENT_FORMATS[name], PUBLISHED[name]
    assert element.bias == published["bias"]
    assert element.emax == published["emax"]
    assert element.max_normal == published["max_normal"]
    assert element.min_normal == published["min_normal"]
    assert element.min_subnormal == published["min_subnormal"]
    assert element.bits == published["bits"]


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_decoded_codes_agree_with_derived_limits(name):
    element = ELEMENT_FORMATS[name]
    grid = [value for value, _ in GRIDS[name]]
    assert grid[-1] == element.max_normal
    assert grid[1] == element.min_subnormal


@pytest.mark.parametrize("name", list(BOUND_CONSTANTS))
def test_bound_constant_is_design_c_fmt(name):
    assert ELEMENT_FORMATS[name].bound_constant == BOUND_CONSTANTS[name]


def test_formats_aliases_and_nvfp4():
    assert set(MX_FORMATS) | {"nvfp4", "mxfp8", "mxfp6", "mxfp4"} == set(FORMATS)
    assert get_format("mxfp8") is get_format("mxfp8_e4m3")
    assert get_format("mxfp6") is get_format("mxfp6_e2m3")
    assert get_format("mxfp4") is get_format("mxfp4_e2m1")
    nvfp4 = get_format("nvfp4")
    assert (nvfp4.element.name, nvfp4.default_block_size, nvfp4.scale, nvfp4.tensor_scale) == (
        "fp4_e2m1",
        16,
        "e4m3",
        True,
    )
    assert all(
        FORMATS[name].default_block_size == 32 and FORMATS[name].scale == "e8m0" for name in MX_FORMATS
    )


def test_mxformat_rejects_an_e4m3_scale_without_tensor_scale():
    with pytest.raises(ValueError, match="tensor_scale"):
        MXFormat("bad", ELEMENT_FORMATS["fp4_e2m1"], scale="e4m3", tensor_scale=False)


# ---------------------------------------------------------------------------------------------------
# Element rounding, checked through whole blocks whose scale is known


def block_with_scale_one(fmt: str, values: torch.Tensor) -> torch.Tensor:
    """Blocks of 32 whose first element is max_normal, so that X = 1 and v/X = v."""
    blocks = values.reshape(-1, 31)
    head = torch.full((blocks.shape[0], 1), get_format(fmt).element.max_normal)
    return torch.cat([head, blocks], dim=1)


def padded_to_31(values: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(values, (0, -len(values) % 31))


@pytest.mark.parametrize("fmt", MX_FORMATS)
@pytest.mark.parametrize("power", [-100, -7, 0, 9, 100])
def test_every_representable_value_round_trips(fmt, power):
    grid = grid_tensor(fmt)
    values = padded_to_31(torch.cat([grid, -grid])) * 2.0**power
    x = block_with_scale_one(fmt, values)
    x[:, 0] *= 2.0**power
    assert_bitwise_equal(quantize(x, fmt), x)


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_exact_midpoints_round_to_the_even_code(fmt):
    grid = GRIDS[get_format(fmt).element.name]
    midpoints = [(low + high) / 2 for (low, _), (high, _) in itertools.pairwise(grid)]
    expected = [float(round_to_grid(m, grid)) for m in midpoints]
    assert any(e == float(high) for e, (high, _) in zip(expected, grid[1:], strict=False)), "some ties go up"
    assert any(e == float(low) for e, (low, _) in zip(expected, grid, strict=False)), "some ties go down"
    x = block_with_scale_one(fmt, padded_to_31(torch.tensor([float(m) for m in midpoints])))
    result = quantize(x, fmt)[:, 1:].flatten()[: len(midpoints)]
    assert result.tolist() == expected


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_values_between_max_normal_and_the_next_binade_saturate(fmt):
    element = get_format(fmt).element
    top = 2.0 ** (element.emax + 1)
    above_max = torch.linspace(element.max_normal, top, 33)[1:-1]
    largest_below_top = torch.nextafter(torch.tensor([top]), torch.tensor([0.0]))  # in float32
    above_max = torch.cat([above_max, largest_below_top])
    x = torch.stack([above_max, -above_max]).reshape(2, 32)
    expected = torch.full_like(x, element.max_normal) * x.sign()
    assert_bitwise_equal(quantize(x, fmt), expected)


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_fp8_e5m2_and_others_never_produce_inf(fmt):
    x = torch.tensor([65504.0, 60000.0, -65000.0, 1.0] * 8).reshape(1, 32) * 2.0**100
    assert quantize(x, fmt).isfinite().all()


# ---------------------------------------------------------------------------------------------------
# Whole blocks against the oracle


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_block_spanning_2e_minus30_to_2e30(fmt):
    generator = torch.Generator().manual_seed(0)
    powers = torch.arange(-30, 34, dtype=torch.float32)
    signs = torch.randint(0, 2, (64,), generator=generator) * 2.0 - 1.0
    mantissas = 1 + torch.rand(64, generator=generator)
    x = (signs * mantissas * 2.0**powers).reshape(2, 32)
    assert_bitwise_equal(quantize(x, fmt), oracle(x, fmt))


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_random_blocks_of_every_magnitude_match_the_oracle(fmt):
    generator = torch.Generator().manual_seed(1)
    magnitudes = torch.exp2(torch.randint(-140, 120, (64, 1), generator=generator).float())
    x = torch.randn(64, 32, generator=generator) * magnitudes
    assert_bitwise_equal(quantize(x, fmt), oracle(x, fmt))


float32s = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def near_grid_values(draw, fmt: str):
    """A grid value or a midpoint of two neighbours, nudged by at most an ulp, at a random scale."""
    grid = GRIDS[get_format(fmt).element.name]
    index = draw(st.integers(0, len(grid) - 2))
    value = (grid[index][0] + grid[index + 1][0]) / 2 if draw(st.booleans()) else grid[index][0]
    nudged = float(value) * (1 + draw(st.sampled_from([-(2.0**-23), 0.0, 2.0**-23])))
    return draw(st.sampled_from([-1.0, 1.0])) * nudged * 2.0 ** draw(st.integers(-120, 120))


@pytest.mark.parametrize("fmt", MX_FORMATS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_property_any_float32_block_matches_the_oracle(fmt, data):
    element_values = st.one_of(float32s, near_grid_values(fmt))
    values = data.draw(st.lists(element_values, min_size=32, max_size=32))
    x = torch.tensor(values, dtype=torch.float32).reshape(1, 32)
    assert_bitwise_equal(quantize(x, fmt), oracle(x, fmt))


def test_scale_exponent_is_exact_just_below_a_power_of_two():
    # float32 log2(2^20 - ulp) rounds to 20.0; the spec's floor(log2) is 19, so the scale is 2^17 and
    # the block max (8 - tiny in units of the scale) saturates to 6 * 2^17 instead of becoming 2^20.
    x = torch.nextafter(torch.tensor(2.0**20), torch.tensor(0.0)).repeat(1, 32)
    assert torch.floor(torch.log2(x[0, 0])) == 20
    assert (quantize(x, "mxfp4") == 6 * 2.0**17).all()


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_float32_subnormal_blocks_use_the_smallest_e8m0_scale(fmt):
    x = torch.tensor([2.0**-149, 2.0**-140, -(2.0**-127), 3 * 2.0**-130] * 8).reshape(1, 32)
    assert_bitwise_equal(quantize(x, fmt), oracle(x, fmt))


# ---------------------------------------------------------------------------------------------------
# Zeros, signs, NaN and Inf


@pytest.mark.parametrize("fmt", [*MX_FORMATS, "nvfp4"])
def test_zero_blocks_stay_zero_and_keep_the_sign_of_zero(fmt):
    x = torch.zeros(4, 32)
    x[1] = -0.0
    x[2, :16] = torch.linspace(-3, 3, 16)
    result = quantize(x, fmt)
    assert_bitwise_equal(result[[0, 1, 3]], x[[0, 1, 3]])


@pytest.mark.parametrize("fmt", [*MX_FORMATS, "nvfp4"])
def test_quantization_is_odd_in_x(fmt):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    assert_bitwise_equal(quantize(-x, fmt), -quantize(x, fmt))


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_tiny_negative_values_round_to_negative_zero(fmt):
    x = torch.tensor([1000.0, -1e-30, 1e-30, -0.0] * 8).reshape(1, 32)
    result = quantize(x, fmt)
    assert result[0, 1] == 0 and result[0, 1].signbit() and not result[0, 2].signbit()


@pytest.mark.parametrize("fmt", MX_FORMATS)
@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf])
def test_a_block_holding_nan_or_inf_becomes_nan_and_its_neighbours_are_untouched(fmt, special):
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    x[1, 7] = special
    result = quantize(x, fmt)
    assert result[1].isnan().all()
    assert_bitwise_equal(result[[0, 2]], quantize(x[[0, 2]], fmt))


def test_nvfp4_nan_anywhere_makes_the_tensor_scale_and_everything_nan():
    x = torch.randn(2, 32)
    x[1, 3] = math.inf
    assert quantize(x, "nvfp4").isnan().all()


# ---------------------------------------------------------------------------------------------------
# Dtypes, shapes, dims, padding


@pytest.mark.parametrize("fmt", [*MX_FORMATS, "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_the_float32_result_in_their_dtype(fmt, dtype):
    x = (torch.randn(16, 64, generator=torch.Generator().manual_seed(4)) * 100).to(dtype)
    result = quantize(x, fmt)
    assert result.dtype == dtype and result.shape == x.shape
    assert_bitwise_equal(result, quantize(x.float(), fmt).to(dtype))


@pytest.mark.parametrize("fmt", MX_FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mx_results_of_half_precision_inputs_need_no_rounding_to_their_dtype(fmt, dtype):
    # An element has at most 8 significant bits and the scale is a power of two: no second rounding.
    x = (torch.randn(16, 64, generator=torch.Generator().manual_seed(4)) * 100).to(dtype)
    assert_bitwise_equal(quantize(x, fmt).float(), quantize(x.float(), fmt))


def test_float64_inputs_are_quantized_in_float32():
    x = torch.randn(4, 32, dtype=torch.float64)
    result = quantize(x, "mxfp4")
    assert result.dtype == torch.float64
    assert torch.equal(result, quantize(x.float(), "mxfp4").double())


@pytest.mark.parametrize("fmt", ["mxfp4", "mxint8", "nvfp4"])
def test_quantizing_along_another_dim_is_quantizing_the_transpose(fmt):
    x = torch.randn(64, 5, 3, generator=torch.Generator().manual_seed(5))
    expected = quantize(x.permute(1, 2, 0), fmt).permute(2, 0, 1)
    assert_bitwise_equal(quantize(x, fmt, dim=0), expected)
    assert_bitwise_equal(quantize(x, fmt, dim=-3), expected)


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nvfp4"])
def test_a_ragged_last_block_is_quantized_as_if_zero_padded(fmt):
    x = torch.randn(6, 45, generator=torch.Generator().manual_seed(6)) * 10
    padded = torch.nn.functional.pad(x, (0, 64 - 45))
    result = quantize(x, fmt, block_size=32)
    assert result.shape == x.shape
    assert_bitwise_equal(result, quantize(padded, fmt, block_size=32)[:, :45])
    # The last, short block has its own scale: shrinking it leaves the first block alone.
    shrunk = x.clone()
    shrunk[:, 32:] /= 1024
    assert_bitwise_equal(quantize(shrunk, fmt, block_size=32)[:, :32], result[:, :32])


@pytest.mark.parametrize("block_size", [1, 8, 16, 32, 64])
def test_block_size_sets_which_elements_share_a_scale(block_size):
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(7)) * torch.exp2(torch.arange(128.0) / 8)
    assert_bitwise_equal(
        quantize(x, "mxfp6_e3m2", block_size=block_size), oracle(x, "mxfp6_e3m2", block_size)
    )


def test_block_size_none_is_the_formats_default():
    x = torch.randn(4, 64)
    assert torch.equal(quantize(x, "mxfp4"), quantize(x, "mxfp4", block_size=32))
    assert torch.equal(quantize(x, "nvfp4"), quantize(x, "nvfp4", block_size=16))
    assert not torch.equal(quantize(x, "nvfp4"), quantize(x, "nvfp4", block_size=32))


def test_empty_tensors_pass_through():
    assert quantize(torch.empty(0, 32), "mxfp4").shape == (0, 32)


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_sqnr_of_gaussian_data_is_above_the_formats_floor(fmt):
    # Floors in the spirit of torchao's test_mx_tensor (18 dB for fp8, 13 dB otherwise), per format.
    floors = {
        "mxfp8_e4m3": 30,
        "mxfp8_e5m2": 24,
        "mxfp6_e3m2": 24,
        "mxfp6_e2m3": 28,
        "mxfp4_e2m1": 16,
        "mxint8": 38,
    }
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(8))
    error = quantize(x, fmt) - x
    sqnr = 10 * torch.log10(x.pow(2).sum() / error.pow(2).sum())
    assert sqnr > floors[fmt]


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("fmt", ["mxfp5", "fp4", "MXFP4", ""])
def test_unknown_format_names_the_choices(fmt):
    with pytest.raises(ValueError, match=r"mxfp4_e2m1.*nvfp4"):
        quantize(torch.ones(32), fmt)


@pytest.mark.parametrize("block_size", [0, -32, 2.5, True])
def test_bad_block_size_says_what_is_allowed(block_size):
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        quantize(torch.ones(32), "mxfp4", block_size=block_size)


@pytest.mark.parametrize(
    "x", [torch.ones(32, dtype=torch.int32), torch.ones(32, dtype=torch.bool), [1.0, 2.0]]
)
def test_non_floating_input_names_the_valid_dtypes(x):
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        quantize(x, "mxfp4")


@pytest.mark.parametrize("dim", [2, -3])
def test_out_of_range_dim_is_rejected(dim):
    with pytest.raises(ValueError, match="dim must index"):
        quantize(torch.ones(4, 32), "mxfp4", dim=dim)


# ---------------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8_e5m2", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_straight_through_gradient_is_the_identity_even_where_values_saturate(fmt, dtype):
    x = (torch.randn(4, 40) * 7).to(dtype).requires_grad_()
    upstream = torch.randn(4, 40).to(dtype)
    (quantize(x, fmt) * upstream).sum().backward()
    assert x.grad.dtype == dtype
    assert torch.equal(x.grad, upstream)


def test_clip_ratio_one_changes_nothing_and_a_smaller_ratio_clips_before_scaling():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(9))
    assert torch.equal(quantize(x, "mxfp4", clip_ratio=1.0), quantize(x, "mxfp4"))
    blocks = x.reshape(8, 2, 32)
    bound = 0.7 * blocks.abs().amax(dim=-1, keepdim=True)
    clipped = torch.maximum(torch.minimum(blocks, bound), -bound).reshape(8, 64)
    assert_bitwise_equal(quantize(x, "mxfp4", clip_ratio=0.7), quantize(clipped, "mxfp4"))


@pytest.mark.parametrize("ratio", [0.0, -0.5, math.nan])
def test_non_positive_clip_ratio_is_rejected(ratio):
    with pytest.raises(ValueError, match="clip_ratio must be positive"):
        quantize(torch.ones(32), "mxfp4", clip_ratio=ratio)


def test_clip_ratio_gradient_flows_to_the_ratio_and_stops_at_clipped_elements():
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(10)).requires_grad_()
    ratio = torch.full((3, 1, 1), 0.6, requires_grad=True)
    upstream = torch.randn(3, 32, generator=torch.Generator().manual_seed(11))
    (quantize(x, "mxfp6", clip_ratio=ratio) * upstream).sum().backward()

    amax = x.detach().abs().amax(dim=-1, keepdim=True)
    clipped = x.detach().abs() > 0.6 * amax
    expected_ratio_grad = (upstream * x.detach().sign() * amax * clipped).sum(dim=-1)
    torch.testing.assert_close(ratio.grad.reshape(3), expected_ratio_grad.reshape(3))
    is_block_max = x.detach().abs() == amax
    assert torch.equal(x.grad[~clipped], upstream[~clipped])
    assert (x.grad[clipped & ~is_block_max] == 0).all()


# ---------------------------------------------------------------------------------------------------
# The fused (torch.compile) path equals the eager reference


@pytest.fixture
def fused_everywhere(monkeypatch):
    """Route every call through torch.compile, with a fresh compile cache."""
    # Dynamo caches graphs per code object for the whole process: without a reset, a graph compiled by
    # an earlier test (any module) is reused and the frame counts below depend on test order.
    torch._dynamo.reset()
    monkeypatch.setenv("LATMIX_MX_COMPILE", "1")
    monkeypatch.setattr(mx, "FUSED_MIN_NUMEL", 0)
    monkeypatch.setattr(mx, "_compiled", {})
    monkeypatch.setattr(mx, "_compile_failed", set())


def special_values_tensor(rows: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(rows, 96, generator=generator) * torch.exp2(
        torch.randint(-130, 100, (rows, 1), generator=generator)
    )
    x[0, :32] = 0.0
    x[1, 3] = math.nan
    x[2, 40] = -math.inf
    x[3, :64] = torch.tensor([2.0**-149, -(2.0**-140)] * 32)
    return x


def eager(x: torch.Tensor, fmt: str, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as patch:
        patch.setenv("LATMIX_MX_COMPILE", "0")
        return quantize(x, fmt)


def compiled_frames() -> int:
    return torch._dynamo.utils.counters["frames"]["ok"]


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8_e4m3", "nvfp4"])
def test_fused_equals_eager_with_one_graph_per_format_for_all_shapes(fmt, fused_everywhere, monkeypatch):
    frames_before = compiled_frames()
    for rows in (8, 5, 13):
        x = special_values_tensor(rows)
        if fmt == "nvfp4":  # one NaN makes the whole tensor NaN, whose payload bits may differ
            x = x.nan_to_num(0.0, 0.0, 0.0)
        assert_bitwise_equal(quantize(x, fmt), eager(x, fmt, monkeypatch))
    # The second format compiles its own graph too (its constants are baked in, not graph inputs).
    assert compiled_frames() == frames_before + 1
    assert list(mx._compiled) == [(get_format(fmt).name, torch.float32, "cpu")]
    assert not mx._compile_failed, "the fused path fell back to eager"


def test_fused_path_runs_under_autograd(fused_everywhere):
    x = torch.randn(4, 64, requires_grad=True)
    frames_before = compiled_frames()
    quantize(x, "mxfp4").sum().backward()
    assert (get_format("mxfp4").name, torch.float32, "cpu") in mx._compiled
    assert compiled_frames() <= frames_before + 1
    assert torch.equal(x.grad, torch.ones_like(x))


def test_compile_failure_warns_once_and_falls_back_to_eager(fused_everywhere, monkeypatch):
    def broken_compile(fn):
        def fail(*args, **kwargs):
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    x = torch.randn(4, 64)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        first = quantize(x, "mxfp6")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = quantize(x, "mxfp6")
    assert torch.equal(first, eager(x, "mxfp6", monkeypatch)) and torch.equal(second, first)


def test_env_var_zero_disables_compilation(fused_everywhere, monkeypatch):
    monkeypatch.setenv("LATMIX_MX_COMPILE", "0")
    quantize(torch.randn(4, 64), "mxfp4")
    assert mx._compiled == {}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [*MX_FORMATS, "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_equals_eager_for_every_format_and_dtype(fmt, dtype, fused_everywhere, monkeypatch):
    x = special_values_tensor(16).clamp(-6e4, 6e4).to(dtype)
    if fmt == "nvfp4":
        x = x.nan_to_num(0.0, 0.0, 0.0)
    frames_before = compiled_frames()
    for shape in ((16, 96), (48, 32)):
        x = x.reshape(shape)
        assert_bitwise_equal(quantize(x, fmt), eager(x, fmt, monkeypatch))
    assert compiled_frames() == frames_before + 1, "compiled (not eager after a recompile limit), once"


# ---------------------------------------------------------------------------------------------------
# Agreement with torchao's MX implementation (optional)


@pytest.fixture(scope="module")
def torchao_mx_formats():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("torchao.prototype.mx_formats")


def torchao_round_trip(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """torchao.prototype.mx_formats quantize + dequantize (FLOOR scale, as the spec)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    if fmt == "nvfp4":
        tensor_scale = per_tensor_amax_to_scale(x.abs().amax())
        return NVFP4Tensor.to_nvfp4(x, 16, per_tensor_scale=tensor_scale).dequantize(x.dtype)
    element = {
        "mxfp8_e4m3": torch.float8_e4m3fn,
        "mxfp8_e5m2": torch.float8_e5m2,
        "mxfp6_e3m2": DTYPE_FP6_E3M2,
        "mxfp6_e2m3": DTYPE_FP6_E2M3,
        "mxfp4_e2m1": torch.float4_e2m1fn_x2,
    }[fmt]
    return MXTensor.to_mx(x, element, 32, scaling_mode=ScaleCalculationMode.FLOOR).dequantize(x.dtype)


TORCHAO_FORMATS = [
    "mxfp8_e4m3",
    "mxfp8_e5m2",
    "mxfp6_e3m2",
    "mxfp6_e2m3",
    "mxfp4_e2m1",
    "nvfp4",
]  # no mxint8 there


@pytest.mark.parametrize("fmt", TORCHAO_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_exact_with_torchao_on_finite_data(fmt, dtype, torchao_mx_formats):
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(64, 128, generator=generator) * torch.exp2(
        torch.randint(-60, 60, (64, 1), generator=generator)
    )
    x[5, :32] = 0.0
    x = x.to(dtype)
    assert_bitwise_equal(quantize(x, fmt), torchao_round_trip(x, fmt))


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp4_e2m1"])
def test_intentional_difference_from_torchao_a_block_with_inf(fmt, torchao_mx_formats):
    # The spec's scale 2^(floor(log2 Inf) - emax) is not an E8M0 number, so the block is NaN (as in
    # the OCP reference, microxcaling). torchao keeps the Inf and flushes the rest of the block.
    x = torch.ones(2, 32)
    x[0, 3] = math.inf
    ours, theirs = quantize(x, fmt), torchao_round_trip(x, fmt)
    assert ours[0].isnan().all()
    assert theirs[0, 3] == math.inf and (theirs[0, :3] == 0).all()
    assert torch.equal(ours[1], theirs[1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", [*MX_FORMATS, "nvfp4"])
def test_cuda_eager_and_fused_results_equal_the_cpu_results(fmt, fused_everywhere, monkeypatch):
    x = special_values_tensor(16)
    if fmt == "nvfp4":
        x = x.nan_to_num(0.0, 0.0, 0.0)
    on_cpu = eager(x, fmt, monkeypatch)
    assert_bitwise_equal(eager(x.cuda(), fmt, monkeypatch).cpu(), on_cpu)
    assert_bitwise_equal(quantize(x.cuda(), fmt).cpu(), on_cpu)
    assert (get_format(fmt).name, torch.float32, "cuda") in mx._compiled
    assert not mx._compile_failed, "the fused path fell back to eager on CUDA"
