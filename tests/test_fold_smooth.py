"""transform.fold_norms and calib.smooth_alpha (ported from the explore branch): both exact, both change
what is quantized; the affine (LATMiX, the default) and affine_literal presets that use them compose and run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import perturb_learnable_transforms, relative_error
from hydra import compose, initialize_config_dir

from latmix import config
from latmix.calibrate import calibrate
from latmix.calibrate.smooth import smooth_init, smooth_log_scales
from latmix.errors import ConfigError
from latmix.quantize import freeze_model, prepare_model
from latmix.settings import OptimConfig, QuantConfig, TransformConfig

CONF = Path(__file__).resolve().parent.parent / "conf"
W4A4 = QuantConfig(weight_format="mxfp4", act_format="mxfp4")
BLOCK_AFFINE = {"family": "affine", "parametrization": "block_diag", "block_size": 32, "init": "block_hadamard"}


pytestmark = pytest.mark.usefixtures("one_thread")


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return config.build_experiment(compose("config", overrides=list(overrides)))


def on_tiny(preset: str, *overrides: str):
    """A preset composed for the tiny test models (hidden 64, d_ff 96, heads 32 wide): blocks wider
    than 32 (the affine presets' 64-blocks) become 32-blocks there."""
    placements = composed(f"transform={preset}").transform.placements
    blocks = [f"transform.placements.{name}.block_size=32"
              for name, spec in placements.items() if (spec.get("block_size") or 0) > 32]
    return composed(f"transform={preset}", *blocks, *overrides)


def presets_with_pre_linear() -> list[str]:
    names = []
    for path in sorted((CONF / "transform").glob("*.yaml")):
        if "pre_linear:" in path.read_text():
            names.append(path.stem)
    return names


def token_ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


# --- fold_norms ----------------------------------------------------------------------------------


def test_the_presets_with_pre_linear_maps_are_found():
    assert {"block_hadamard", "flatquant", "affine_block", "affine"} <= set(presets_with_pre_linear())


@pytest.mark.parametrize("arch", ["llama", "llama_96"])
@pytest.mark.parametrize("preset", presets_with_pre_linear())
@torch.no_grad()
def test_fold_norms_false_preserves_the_function_of_every_preset_with_pre_linear_maps(
    make_tiny_model, arch, preset, input_ids
):
    transform = on_tiny(preset, "transform.fold_norms=false").transform
    assert transform.fold_norms is False
    model = make_tiny_model(arch)
    reference = model(input_ids).logits
    norms = [m.weight.clone() for m in model.modules() if "RMSNorm" in type(m).__name__]
    prepared = prepare_model(model, transform, QuantConfig())
    after = [m.weight for m in model.modules() if "RMSNorm" in type(m).__name__]
    assert all(torch.equal(a, b) for a, b in zip(after, norms, strict=True))  # the norms keep their weights
    perturb_learnable_transforms(prepared)
    assert relative_error(model(input_ids).logits, reference) < 1e-5
    freeze_model(prepared)
    assert relative_error(model(input_ids).logits, reference) < 1e-5


def _gate_operands(make_tiny_model, fold_norms: bool, input_ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the gate linear's input before its map, the operand it quantizes, the logits) with norm weight 0 on channel 5."""
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[5] = 0.0
    transform = TransformConfig({"pre_linear": {"family": "block_hadamard", "block_size": 32}}, fold_norms=fold_norms)
    prepare_model(model, transform, W4A4)
    gate = model.model.layers[0].mlp.gate_proj
    seen = []
    handle = gate.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        logits = model(input_ids).logits
        handle.remove()
        operand = gate.gemm_input(seen[0])
    return seen[0], operand, logits


def test_fold_norms_false_keeps_the_norm_weight_in_the_quantized_operand(make_tiny_model, input_ids):
    kept, kept_operand, kept_logits = _gate_operands(make_tiny_model, False, input_ids)
    folded, folded_operand, folded_logits = _gate_operands(make_tiny_model, True, input_ids)
    # Not folded: the map's input is the norm output with its weight, so the channel the norm zeroes is 0.
    assert torch.all(kept[..., 5] == 0)
    # Folded: the map's input is the bare normalized stream, that channel included (its reader ignores it).
    assert folded[..., 5].abs().min() > 0
    assert not torch.allclose(kept_operand, folded_operand)
    assert not torch.allclose(kept_logits, folded_logits)


def test_fold_norms_false_with_a_residual_map_says_what_to_change():
    with pytest.raises(ValueError, match=r"placement residual needs them folded.*set transform\.fold_norms=true"):
        TransformConfig({"residual": {"family": "hadamard"}}, fold_norms=False)
    with pytest.raises(ConfigError, match=r"^transform: transform\.fold_norms=false"):
        composed("transform=hadamard", "transform.fold_norms=false")


# --- smooth_alpha --------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, -0.1, 2, "half", True])
def test_a_bad_smooth_alpha_is_a_config_error_saying_what_to_change(alpha):
    with pytest.raises(ConfigError, match=r"^calib: calib.smooth_alpha=.* use a number with 0 <= alpha < 1"):
        composed(f"calib.smooth_alpha={alpha}")


def test_smooth_log_scales_follow_the_formula_centered():
    x_max, w_max = torch.tensor([4.0, 1.0, 0.25, 16.0]), torch.tensor([1.0, 4.0, 1.0, 0.25])
    log_s = smooth_log_scales(x_max, w_max, 0.5)
    raw = 0.5 * x_max.log() - 0.5 * w_max.log()  # log(sqrt(x / w)) = log [2, 0.5, 0.5, 8]
    assert torch.allclose(log_s, raw - raw.mean()) and abs(float(log_s.sum())) < 1e-6


def _reader_ranges(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per channel max |input| of layer 0's q/k/v (the input norm's output), of down_proj, and of v's output
    per head, in the original model."""
    layer = model.model.layers[0]
    seen: dict[str, torch.Tensor] = {}

    def keep(name, value, width):
        m = value.detach().abs().reshape(-1, width).amax(0)
        seen[name] = m if name not in seen else torch.maximum(seen[name], m)

    hooks = [
        layer.input_layernorm.register_forward_hook(lambda m, a, out: keep("attn", out, 64)),
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: keep("down", a[0], 96)),
        layer.self_attn.v_proj.register_forward_hook(lambda m, a, out: keep("vo", out, 32)),
    ]
    with torch.no_grad():
        for start in range(0, ids.shape[0], 2):
            model(ids[start : start + 2])
    for handle in hooks:
        handle.remove()
    return seen


def test_smooth_init_sets_the_scales_the_formula_gives_and_keeps_log_det_zero(make_tiny_model):
    # Maps that start at the identity (qr, no rotation part): after smoothing, A = diag(1/s) exactly.
    ids, alpha = token_ids(5, 16, 0), 0.4
    original = make_tiny_model("llama")
    ranges = _reader_ranges(original, ids)
    layer = original.model.layers[0]
    attn_w = torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight])
    weights = {
        "attn": attn_w.abs().amax(0),
        "down": layer.mlp.down_proj.weight.abs().amax(0),
        "vo": layer.self_attn.o_proj.weight.abs().reshape(64, -1, 32).amax((0, 1)),
    }
    spec = {"family": "affine", "parametrization": "qr", "init": "identity"}
    transform = TransformConfig({p: spec for p in ("pre_linear", "attn_vo", "down_proj")}, fold_norms=False)
    prepared = prepare_model(make_tiny_model("llama"), transform, W4A4)
    done = smooth_init(prepared, ids, alpha, batch_size=2)
    assert len(done) == 2 * 4  # two layers x (pre_linear attn and mlp, attn_vo, down_proj)
    for key, name in (("attn", "pre_linear_attn"), ("down", "down_proj"), ("vo", "attn_vo")):
        raw = alpha * ranges[key].log() - (1 - alpha) * weights[key].log()
        expected = torch.diag(torch.exp(-(raw - raw.mean())))
        t = prepared.transforms[f"layers.0.{name}"]
        assert torch.allclose(t.matrix().detach(), expected, rtol=1e-4, atol=1e-6), name
        assert abs(float(t.log_abs_det().detach())) < 1e-4


@pytest.mark.parametrize("parametrization", ["qr", "lu", "svd"])
@torch.no_grad()
def test_smooth_init_preserves_the_function(make_tiny_model, input_ids, parametrization):
    model = make_tiny_model("llama")
    reference = model(input_ids).logits
    spec = {**BLOCK_AFFINE, "factor": parametrization}
    transform = TransformConfig({p: spec for p in ("pre_linear", "attn_vo", "down_proj")}, fold_norms=False)
    prepared = prepare_model(model, transform, QuantConfig())
    if parametrization != "svd":
        perturb_learnable_transforms(prepared)  # off its start (an upper part that is not 0): the scale still goes in exactly
    before = {n: t.matrix().detach().clone() for n, t in prepared.transforms.items()}
    assert len(smooth_init(prepared, token_ids(4, 16, 0), 0.5, batch_size=2)) == 8
    for name, t in prepared.transforms.items():
        # A <- A diag(1/s) exactly: A_before^-1 A_after is a diagonal (not the identity), even off the start.
        ratio = torch.linalg.solve(before[name].double(), t.matrix().double())
        diagonal = torch.diagonal(ratio)
        assert torch.allclose(ratio, torch.diag(diagonal), atol=1e-5), name
        assert not torch.allclose(diagonal, torch.ones_like(diagonal)), name
    assert relative_error(model(input_ids).logits, reference) < 1e-5
    freeze_model(prepared)
    assert relative_error(model(input_ids).logits, reference) < 1e-5


def _affine_calibration(make_tiny_model, caplog, *overrides: str):
    exp = on_tiny("affine", "calib.n_samples=4", "calib.seq_len=16", *overrides)
    calib = dataclasses.replace(exp.calib, grad_checkpointing=False, autocast_dtype=None)
    prepared = prepare_model(make_tiny_model("llama"), exp.transform, W4A4)
    start = {n: t.matrix().detach().clone() for n, t in prepared.transforms.items()}
    with caplog.at_level("INFO", logger="latmix.calibrate"):
        report = calibrate(prepared, make_tiny_model("llama"), token_ids(4, 16, 0), calib, OptimConfig(), None)
    return exp, prepared, start, report


def test_the_affine_preset_smooths_and_skips_learning(make_tiny_model, caplog):
    exp, prepared, start, report = _affine_calibration(make_tiny_model, caplog, "calib.mode=none")
    assert (exp.transform.fold_norms, exp.calib.smooth_alpha, exp.calib.mode) == (False, 0.5, "none")
    assert report.skipped == "calib.mode=none" and report.steps == 0 and report.smoothed == 8
    messages = [r.getMessage() for r in caplog.records]
    assert sum("calib.smooth_alpha=0.5: per-channel scales of 8 learnable affine map(s) set" in m for m in messages) == 1
    assert "calibration skipped: calib.mode=none" in messages
    assert report.as_record()["smoothed"] == 8
    # The online pre-linear and down_proj maps stay after freezing: they carry the smoothed scales.
    assert not torch.allclose(prepared.transforms["layers.0.pre_linear_mlp"].matrix(), start["layers.0.pre_linear_mlp"])


def test_smooth_alpha_zero_leaves_the_start_unchanged(make_tiny_model, caplog):
    _, prepared, start, report = _affine_calibration(make_tiny_model, caplog, "calib.mode=none", "calib.smooth_alpha=0")
    assert report.smoothed is None
    assert not any("smooth_alpha" in r.getMessage() for r in caplog.records)
    for name in ("layers.0.pre_linear_attn", "layers.1.down_proj"):
        assert torch.equal(prepared.transforms[name].matrix(), start[name])


@torch.no_grad()
def test_kronecker_maps_with_channel_scales_take_the_smoothing_there(make_tiny_model, input_ids):
    # FlatQuant's start: a random orthogonal Kronecker map whose per-channel scale d is SmoothQuant's 1/s.
    model = make_tiny_model("llama")
    reference = model(input_ids).logits
    kron = {"family": "affine", "parametrization": "kronecker", "factor": "svd", "init": "random",
            "channel_scales": True}
    prepared = prepare_model(model, TransformConfig({"pre_linear": kron, "down_proj": kron}, fold_norms=False), QuantConfig())
    before = {n: t.matrix().detach().clone() for n, t in prepared.transforms.items()}
    assert len(smooth_init(prepared, token_ids(4, 16, 0), 0.3, batch_size=2)) == 6
    for name, t in prepared.transforms.items():
        ratio = torch.linalg.solve(before[name].double(), t.matrix().double())
        torch.testing.assert_close(ratio, torch.diag(torch.exp(t.channel_log_scale.double())), atol=1e-5, rtol=1e-5)
        assert abs(float(t.channel_log_scale.sum())) < 1e-3 and float(t.channel_log_scale.std()) > 0
    assert relative_error(model(input_ids).logits, reference) < 1e-5


def test_kronecker_maps_are_left_as_they_are_and_counted(make_tiny_model, caplog):
    kron = {"family": "affine", "parametrization": "kronecker"}
    prepared = prepare_model(make_tiny_model("llama"), TransformConfig({"pre_linear": kron}, fold_norms=False), W4A4)
    with caplog.at_level("INFO", logger="latmix.calibrate"):
        assert smooth_init(prepared, token_ids(2, 16, 0), 0.5, batch_size=2) == []
    assert caplog.records[-1].getMessage().endswith("of 0 learnable affine map(s) set from activation and weight "
                                                    "ranges (SmoothQuant start, function unchanged); 4 left as they "
                                                    "are (kronecker)")
