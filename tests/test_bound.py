"""The MX error bound: never below the actual error, for every format and any invertible affine map."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latmix.bound import bound_surrogate, format_constant, measure, mx_error_bound
from latmix.formats import FORMATS

# Distinct formats (the aliases mxfp4/mxfp6/mxfp8 name formats already in the table).
FORMAT_NAMES = sorted({fmt.name for fmt in FORMATS.values()})
# The bound is computed in float64 and the error through a float32 quantizer: allow rounding noise.
RELATIVE_SLACK = 1e-6


def random_affine(
    d: int, log10_condition: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A = U diag(s) V^T with singular values spread over 10^log10_condition, and a random shift."""
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    s = torch.logspace(0, -log10_condition, d, dtype=torch.float64)
    return (U * s) @ V.T, torch.randn(d, generator=generator)


def activations_with_outliers(tokens: int, d: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(tokens, d, generator=generator) * scale
    x[:, torch.randperm(d, generator=generator)[:3]] *= 50.0
    return x


def assert_bound_holds(result: dict) -> None:
    assert math.isfinite(result["bound"]) and math.isfinite(result["error"])
    assert result["error"] <= result["bound"] * (1 + RELATIVE_SLACK), result


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    log10_condition=st.floats(0.0, 6.0),
    log10_scale=st.floats(-30.0, 30.0),
    d=st.sampled_from([32, 48, 64]),
)
def test_bound_is_never_below_the_error_for_random_affine_maps(fmt, seed, log10_condition, log10_scale, d):
    generator = torch.Generator().manual_seed(seed)
    A, b = random_affine(d, log10_condition, generator)
    x = activations_with_outliers(8, d, 10.0**log10_scale, generator)
    assert_bound_holds(measure(A.float(), b * 10.0**log10_scale, x, fmt))


def adversarial_blocks(block: int) -> dict[str, torch.Tensor]:
    """Inputs at the places where MX rounding is worst, as rows of an identity-transformed batch."""
    k = torch.arange(block, dtype=torch.float32)
    ramp = 1.0 + k / block  # every offset of the top binade, midpoints included
    return {
        # block max just under the next power of two: the most saturation the format allows
        "saturation": torch.full((4, block), 2.0 - 2.0**-20)
        * torch.tensor([[1.0], [4.0], [2.0**-50], [2.0**60]]),
        "binade_sweep": torch.stack([ramp * 2.0**e for e in (-10, 0, 3, 40)]),
        "one_outlier": torch.cat([torch.full((2, block - 1), 1e-3), torch.full((2, 1), 1e3)], dim=1),
        "sign_alternating": ramp * (-1.0) ** k,
        # magnitudes where E8M0 clamps at 2^-127 (and float32 goes subnormal)
        "tiny": torch.stack([ramp * 2.0**-135, ramp * 2.0**-140]),
        "mixed_scales_in_one_tensor": torch.stack([ramp * 1e-30, ramp * 1e30]),
        "zeros": torch.zeros(2, block),
    }


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_bound_holds_on_adversarial_inputs(fmt):
    block = FORMATS[fmt].default_block_size
    for name, rows in adversarial_blocks(block).items():
        y = rows.reshape(-1, block).repeat(1, 2)
        result = measure(torch.eye(y.shape[-1]), None, y, fmt)
        assert result["error"] <= result["bound"] * (1 + RELATIVE_SLACK), (name, result)


@pytest.mark.parametrize(
    ("fmt", "constant"),
    [("mxfp4", 0.5), ("mxfp6_e2m3", 0.125), ("mxfp6_e3m2", 0.25), ("mxfp8_e4m3", 0.25), ("mxint8", 1 / 64)],
)
def test_format_constants_match_the_design(fmt, constant):
    assert format_constant(fmt) == constant


def test_bound_is_not_vacuous_where_saturation_is_worst():
    # A FP4 block of values just under 8 clips each to 6: error 2 per element of a 0.5 * 8 = 4 allowance.
    y = torch.full((1, 32), 8.0 - 2.0**-18)
    result = measure(torch.eye(32), None, y, "mxfp4")
    assert result["tightness"] == pytest.approx(0.5, rel=1e-4)


def test_bound_grows_with_the_inverse_norm_of_the_map():
    generator = torch.Generator().manual_seed(0)
    x = activations_with_outliers(16, 64, 1.0, generator)
    A, _ = random_affine(64, 0.0, generator)
    rotation_bound = mx_error_bound(A.float(), None, x, "mxfp4")
    # The same map scaled down by 4: every block max shrinks 4x and ||A^-1|| grows 4x.
    assert mx_error_bound(A.float() / 4, None, x, "mxfp4") == pytest.approx(float(rotation_bound), rel=1e-5)
    stretched = A.clone()
    stretched[:, 0] *= 1e-3
    assert mx_error_bound(stretched.float(), None, x, "mxfp4") > 100 * rotation_bound


def test_surrogate_is_above_the_bound_and_differentiable():
    generator = torch.Generator().manual_seed(1)
    x = activations_with_outliers(16, 64, 1.0, generator)
    A64, b = random_affine(64, 1.0, generator)
    A = A64.float().requires_grad_()
    y = x @ A.T + b
    surrogate = bound_surrogate(y, A, "mxfp4")
    assert float(surrogate.detach()) >= float(mx_error_bound(A.detach(), b, x, "mxfp4")) * (
        1 - RELATIVE_SLACK
    )
    surrogate.backward()
    assert A.grad is not None and A.grad.abs().sum() > 0 and A.grad.isfinite().all()
