"""calib.rounding=noise: while learning, each quantizer adds uniform noise as wide as the rounding step it
would apply (mx.with_rounding_noise), a loss smooth in the maps; measurement, GPTQ and evaluation round."""

from __future__ import annotations

import pytest
import torch

from latmix import mx
from latmix.calibrate import calibrate
from latmix.quantize import QuantLinear, prepare_model, rounding_noise
from latmix.settings import CalibConfig, OptimConfig, QuantConfig, TransformConfig

pytestmark = pytest.mark.usefixtures("one_thread")

FORMATS = ("mxfp4", "nvfp4", "mxfp6_e2m3", "mxfp8_e4m3", "mxint8")


def spread_values(seed: int = 0) -> torch.Tensor:
    """Rows whose magnitudes span three decades, so blocks hold subnormal, normal and top-binade elements."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(256, 128, generator=generator) * torch.logspace(-2, 1, 128)


def test_the_noise_stays_within_half_the_rounding_step_and_beyond_the_top_code_saturates():
    # One mxfp4 block with max 7.5: its scale is 1, so 5 has step 2, 3.1 step 1 and 0.3 (subnormal) step
    # 0.5; 7.5 is beyond the top code, 6, and becomes 6 as round to nearest makes it.
    block = torch.zeros(4096, 32)
    block[:, :4] = torch.tensor([5.0, 3.1, 0.3, 7.5])
    torch.manual_seed(0)
    noisy = mx.with_rounding_noise(block, "mxfp4")
    noise = (noisy - block)[:, :3].abs().amax(dim=0)
    half_steps = torch.tensor([1.0, 0.5, 0.25])
    assert torch.all(noise <= half_steps) and torch.all(noise > 0.95 * half_steps)
    assert torch.all(noisy[:, 3] == 6.0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_noise_has_about_the_mean_square_error_of_round_to_nearest(fmt):
    x = spread_values()
    torch.manual_seed(0)
    noise_mse = (mx.with_rounding_noise(x, fmt) - x).pow(2).mean()
    rounding_mse = (mx.quantize(x, fmt) - x).pow(2).mean()
    assert 0.9 < noise_mse / rounding_mse < 1.1


def test_zero_blocks_stay_zero_and_the_draw_follows_the_torch_seed():
    x = spread_values()
    x[:, :32] = 0
    torch.manual_seed(3)
    first = mx.with_rounding_noise(x, "mxfp4")
    torch.manual_seed(3)
    assert torch.equal(first, mx.with_rounding_noise(x, "mxfp4"))
    assert torch.all(first[:, :32] == 0)


def test_the_gradient_reaches_each_blocks_max_through_the_coarseness_of_its_grid():
    """Round to nearest's straight-through gradient is the identity; the noise's also says that a larger
    block max widens every step of its block: d(noise_i)/d(amax) = noise_i / amax."""
    x = torch.tensor([[0.3, -6.0, 3.1, 1.2] + [0.0] * 28])
    weights = torch.linspace(-1.0, 1.0, 32)
    x.requires_grad_(True)
    torch.manual_seed(0)
    noisy = mx.with_rounding_noise(x, "mxfp4")
    (noisy * weights).sum().backward()
    noise = (noisy - x).detach()
    expected = weights.clone()
    expected[1] += -(weights * noise).sum() / 6.0  # the max is -6: |x| grows as x falls
    torch.testing.assert_close(x.grad[0], expected)


def test_clip_ratio_clips_before_the_noise_is_added():
    x = torch.tensor([[6.0, 1.0] + [0.0] * 30])
    torch.manual_seed(0)
    clipped = mx.with_rounding_noise(x, "mxfp4", clip_ratio=0.5)
    assert 3.0 - 0.5 <= clipped[0, 0] <= 3.0 + 0.5  # clipped to 3: scale 0.5, step 1 in the top binade


def tiny_prepared(make_tiny_model, quant: QuantConfig):
    transform = TransformConfig({p: {"family": "affine"} for p in ("pre_linear", "attn_vo", "down_proj")})
    return prepare_model(make_tiny_model("llama"), transform, quant)


def test_inside_rounding_noise_every_quantizer_draws_and_after_it_rounds_again(make_tiny_model):
    quant = QuantConfig(weight_format="mxfp4", act_format="mxfp4", kv_format="mxfp4")
    model = tiny_prepared(make_tiny_model, quant).model
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rounded = model(ids).logits
        with rounding_noise(model):
            first, second = model(ids).logits, model(ids).logits
        assert not torch.equal(first, second)
        assert not torch.equal(first, rounded)
        assert torch.equal(model(ids).logits, rounded)
    switches = [m.rounding_noise for m in model.modules() if hasattr(m, "rounding_noise")]
    assert len(switches) > 0 and not any(switches)


def test_calibration_learns_under_noise_and_measures_with_round_to_nearest(make_tiny_model):
    quant = QuantConfig(weight_format="mxfp4", act_format="mxfp4", weight_quantizer="gptq")
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    reports = {}
    for rounding in ("nearest", "noise"):
        prepared = tiny_prepared(make_tiny_model, quant)
        linears = [m for m in prepared.model.modules() if isinstance(m, QuantLinear)]
        seen: list[bool] = []
        cfg = CalibConfig(source="local", epochs=1, batch_size=2, grad_checkpointing=False, rounding=rounding)
        reports[rounding] = calibrate(
            prepared, make_tiny_model("llama"), ids, cfg, OptimConfig(), None,
            on_step=lambda progress, linears=linears, seen=seen: seen.append(all(m.rounding_noise for m in linears)),
        )
        assert seen == [rounding == "noise"] * 2
        assert not any(m.rounding_noise for m in linears)
    # The measurement before learning rounds to nearest in both: the same model, the same loss.
    assert reports["noise"].loss_before == reports["nearest"].loss_before
    assert reports["noise"].loss_after != reports["nearest"].loss_after


def test_an_unknown_rounding_says_what_to_choose():
    with pytest.raises(ValueError, match=r"calib.rounding='stochastic' is not supported.*nearest.*noise"):
        CalibConfig(rounding="stochastic")
