"""LATMiX calibration: learned affine maps beat fixed transforms under MXFP4; runs resume bit for bit."""

from __future__ import annotations

import contextlib

import pytest
import torch

from latmix.calibrate import NonFiniteError, calibrate
from latmix.calibrate.trainer import param_groups
from latmix.fidelity import Reference, deviation
from latmix.losses import next_token_ce
from latmix.models import inject_channel_outliers
from latmix.optim import build_optimizer, lr_factor, set_lr
from latmix.quantize import prepare_model
from latmix.settings import CalibConfig, OptimConfig, QuantConfig, TransformConfig

W4A4 = QuantConfig(weight_format="mxfp4", act_format="mxfp4")
FIXED_FAMILIES = ("hadamard", "block_hadamard", "rotation")


pytestmark = pytest.mark.usefixtures("one_thread")


def placements(family: str | None, **kwargs) -> dict:
    """The FlatQuant-style per-block placements (pre-linear, v->o, down_proj) with one family, or none."""
    if family is None:
        return {}
    return {p: {"family": family, **kwargs} for p in ("pre_linear", "attn_vo", "down_proj")}


def model_with_outliers(build, seed: int = 0) -> torch.nn.Module:
    """A tiny Llama whose linears see two massive input channels and whose next-token distribution is
    sharp enough (lm_head x8) for quantization to move it measurably."""
    model = build("llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    inject_channel_outliers(model, n_channels=2, scale=30.0, seed=0)
    return model


def token_ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def quick_config(**overrides) -> CalibConfig:
    values = {
        "source": "local",
        "epochs": 3,
        "batch_size": 2,
        "grad_checkpointing": False,
        "checkpoint_every": 2,
    }
    return CalibConfig(**{**values, **overrides})


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "joint"}, "calib.mode='joint' is not supported"),
        ({"objective": "mse"}, "calib.objective='mse' is not supported"),
        ({"mode": "end_to_end", "objective": "block_mse"}, "use mode=layer_wise"),
        ({"mode": "layer_wise", "objective": "kl"}, "use mode=end_to_end"),
        ({"epochs": 0}, "calib.epochs must be >= 1"),
        ({"cond_limit": 1.0}, "calib.cond_limit must be > 1"),
        ({"autocast_dtype": "fp8"}, "calib.autocast_dtype='fp8' is not supported"),
        ({"batch_size": 4, "micro_batch_size": 8}, "calib.micro_batch_size=8 must be between 1 and calib.batch_size=4"),
        ({"micro_batch_size": 0}, "calib.micro_batch_size=0 must be between 1"),
        ({"layer_inputs": "fp"}, "calib.layer_inputs='fp' is not supported"),
        ({"mode": "end_to_end", "layer_inputs": "full_precision"}, "use mode=layer_wise or layer_inputs=quantized"),
    ],
)
def test_bad_calibration_settings_say_what_to_change(overrides, message):
    with pytest.raises(ValueError, match=message):
        CalibConfig(**overrides)


def test_defaults_are_the_project_reading_of_latmix():
    cfg, optim = CalibConfig(), OptimConfig()
    assert (cfg.mode, cfg.objective, cfg.n_samples, cfg.seq_len, cfg.source) == (
        "end_to_end",
        "kl",
        128,
        2048,
        "wikitext2",
    )
    assert cfg.reg_weight > 0 and (optim.name, optim.schedule) == ("adamw", "cosine")


# --- measurement without learning ----------------------------------------------------------------


def test_mode_none_still_measures_bound_and_error_per_layer(make_tiny_model):
    fp_model = model_with_outliers(make_tiny_model)
    prepared = prepare_model(model_with_outliers(make_tiny_model), TransformConfig(placements("hadamard")), W4A4)
    report = calibrate(
        prepared,
        fp_model,
        token_ids(2, 16, 0),
        quick_config(mode="none"),
        OptimConfig(),
        None,
        heldout_ids=token_ids(2, 16, 1),
    )
    record = report.as_record()
    assert record["steps"] == 0 and record["loss_before"] == record["loss_after"] > 0
    assert len(record["per_layer"]) == 2 * 7
    for row in record["per_layer"]:
        assert 0 < row["error_after"] <= row["bound_after"]
        assert row["bound_before"] == row["bound_after"] and 0 < row["tightness_after"] <= 1
        assert 0 < row["heldout_error_after"] <= row["heldout_bound_after"]
        assert row["cond"] == pytest.approx(1.0, abs=1e-4)


# --- learned affine beats every fixed transform ---------------------------------------------------


@torch.no_grad()
def sampled_text(model: torch.nn.Module, n: int, length: int, seed: int) -> torch.Tensor:
    """n sequences drawn from the model's own next-token distribution.

    On text the full-precision model generates, E[-log q] = H(p) + KL(p || q): held-out perplexity
    measures the quantized model's KL to it, as it does on natural text for a trained model. Uniformly
    random tokens have no such link (a quantized model can "improve" their perplexity by chance).
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n, 1), generator=generator)
    for _ in range(length - 1):
        probs = torch.softmax(model(ids).logits[:, -1].float(), dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids


@pytest.fixture(scope="module")
def ordering_data():
    """64 calibration and 256 held-out sequences of 32 tokens sampled from the outlier model."""
    from conftest import build_tiny_model

    torch.set_num_threads(1)
    fp_model = model_with_outliers(build_tiny_model)
    return sampled_text(fp_model, 64, 32, seed=10), sampled_text(fp_model, 256, 32, seed=11)


@pytest.fixture(scope="module")
def fixed_baselines(ordering_data):
    """The metrics of `summary` for every fixed family, and for no transform."""
    from conftest import build_tiny_model

    calib_ids, heldout_ids = ordering_data
    results = {}
    torch.set_num_threads(1)
    for family in (None, *FIXED_FAMILIES):
        fp_model = model_with_outliers(build_tiny_model)
        prepared = prepare_model(
            model_with_outliers(build_tiny_model), TransformConfig(placements(family)), W4A4
        )
        report = calibrate(prepared, fp_model, calib_ids, quick_config(mode="none"), OptimConfig(), None)
        results[family or "identity"] = summary(report, prepared, fp_model, heldout_ids)
    return results


def summary(report, prepared, fp_model, heldout_ids) -> dict[str, float]:
    """Calibration KL, held-out KL, held-out perplexity above full precision, mean block output error."""
    blocks = {row["block"]: row["loss_after"] for row in report.per_layer}
    heldout = deviation(prepared.model, Reference.of(fp_model, heldout_ids))
    return {
        "kl": report.loss_after,
        "heldout_kl": heldout["kl"],
        "heldout_ppl_excess": heldout["ppl"] - heldout["ref_ppl"],
        "block_error": sum(blocks.values()) / len(blocks),
    }


@pytest.mark.parametrize(
    # Each metric of the learned affine maps as a fraction of the best fixed family's (deterministic:
    # fixed seeds, one thread). Measured on an AMD EPYC: end_to_end held-out KL 0.85, held-out
    # perplexity excess 0.84, calibration KL 0.86; layer_wise held-out KL 0.83, perplexity excess 0.78,
    # block error 0.76. Over 3 model seeds x 2 data seeds: held-out KL 0.79-0.90, perplexity excess
    # 0.73-0.96, layer-wise block error 0.76-0.88; end_to_end does not target block error (0.80-0.97),
    # so it is not asserted. Nor is the calibration KL (the report's, on 4 calibration sequences): on an
    # AVX-512 Xeon it is 1.04 of block_hadamard's while held-out KL is 0.85 and perplexity excess 0.79;
    # block_hadamard's own calibration KL is 0.86 of its held-out KL there, so 4 sequences measure the
    # processor's rounding flips as much as the maps.
    ("mode", "objective", "ratios"),
    [
        ("end_to_end", "kl", {"heldout_kl": 0.93, "heldout_ppl_excess": 0.93}),
        ("layer_wise", "block_mse", {"block_error": 0.9, "heldout_kl": 0.93, "heldout_ppl_excess": 0.93}),
    ],
)
def test_calibrated_affine_beats_every_fixed_transform_under_mxfp4(
    make_tiny_model, ordering_data, fixed_baselines, mode, objective, ratios
):
    calib_ids, heldout_ids = ordering_data
    fp_model = model_with_outliers(make_tiny_model)
    prepared = prepare_model(
        model_with_outliers(make_tiny_model), TransformConfig(placements("affine", init="hadamard")), W4A4
    )
    cfg = quick_config(mode=mode, objective=objective, epochs=10, batch_size=8)
    report = calibrate(prepared, fp_model, calib_ids, cfg, OptimConfig(lr=5e-3), None)
    learned = summary(report, prepared, fp_model, heldout_ids)
    for metric, ratio in ratios.items():
        best_fixed = min(result[metric] for result in fixed_baselines.values())
        assert learned[metric] < ratio * best_fixed, (metric, learned, fixed_baselines)


# --- resume ---------------------------------------------------------------------------------------


class Preempted(Exception):
    pass


def kill_at(step_or_block: str, value: int):
    def callback(progress: dict) -> None:
        if progress.get(step_or_block) == value:
            raise Preempted

    return callback


def run(build, cfg, ckpt_dir, on_step=None, optim=None):
    fp_model = build("llama", seed=3)
    prepared = prepare_model(
        build("llama", seed=3), TransformConfig(placements("affine", init="hadamard")), W4A4
    )
    transforms = dict(prepared.transforms)
    optim = OptimConfig(lr=1e-2) if optim is None else optim
    report = calibrate(prepared, fp_model, token_ids(4, 16, 2), cfg, optim, ckpt_dir, on_step=on_step)
    return report, state_of(transforms)


def start_state(build) -> dict[str, torch.Tensor]:
    """The maps of `run` before calibration."""
    return state_of(
        prepare_model(build("llama", seed=3), TransformConfig(placements("affine", init="hadamard")), W4A4).transforms
    )


def state_of(transforms: dict) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().clone() for n, t in transforms.items() for k, v in t.state_dict().items()}


@pytest.mark.parametrize(
    ("mode", "objective", "rounding", "kill"),
    [
        ("end_to_end", "kl", "nearest", ("step", 3)),
        ("end_to_end", "kl", "noise", ("step", 3)),  # the resumed run draws the noise it would have drawn
        ("layer_wise", "block_mse", "nearest", ("block", 0)),
    ],
)
def test_killed_run_resumes_to_bit_identical_transforms(make_tiny_model, tmp_path, mode, objective, rounding, kill):
    cfg = quick_config(mode=mode, objective=objective, rounding=rounding)
    _, uninterrupted = run(make_tiny_model, cfg, tmp_path / "straight")
    with pytest.raises(Preempted):
        run(make_tiny_model, cfg, tmp_path / "resumed", on_step=kill_at(*kill))
    report, resumed = run(make_tiny_model, cfg, tmp_path / "resumed")
    assert report.resumed_from_step is not None and report.resumed_from_step > 0
    assert uninterrupted.keys() == resumed.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(tensor, resumed[name]), name
    start = start_state(make_tiny_model)
    assert any(not torch.equal(start[name], tensor) for name, tensor in resumed.items()), (
        "training changed nothing"
    )


@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_a_step_in_micro_batches_moves_the_maps_as_the_whole_batch_does(make_tiny_model, micro_batch_size):
    # SGD without momentum moves each parameter by lr x its gradient: equal moves are equal gradients.
    start = start_state(make_tiny_model)

    def moves(micro: int | None) -> dict[str, torch.Tensor]:
        cfg = quick_config(batch_size=4, steps=1, micro_batch_size=micro, measure=False)
        optim = OptimConfig(name="sgd", lr=1e-2, momentum=0.0, grad_clip=None)
        _, learned = run(make_tiny_model, cfg, None, optim=optim)
        return {name: tensor - start[name] for name, tensor in learned.items()}

    whole, split = moves(None), moves(micro_batch_size)
    assert any(move.abs().max() > 0 for move in whole.values()), "the step moved nothing"
    for name, move in whole.items():
        # The micro-batches' forwards reduce in another order, so equal up to float rounding.
        assert torch.allclose(split[name], move, rtol=1e-4, atol=1e-4 * move.abs().max() + 1e-12), name


def test_a_checkpoint_from_another_calibration_is_not_resumed(make_tiny_model, tmp_path, caplog):
    run(make_tiny_model, quick_config(mode="end_to_end"), tmp_path)
    with caplog.at_level("WARNING", logger="latmix.calibrate.checkpoint"):
        report, _ = run(make_tiny_model, quick_config(mode="end_to_end", reg_weight=0.5), tmp_path)
    assert report.resumed_from_step is None
    assert "written with other calibration settings: not resumed, calibration starts over" in caplog.text


# --- guards ---------------------------------------------------------------------------------------


# measure=False: the NaN is first met in training, not in the bound/error measurement before it.
@pytest.mark.parametrize("measure", [True, False])
@pytest.mark.parametrize(("mode", "objective"), [("end_to_end", "kl"), ("layer_wise", "block_mse")])
def test_non_finite_activation_is_caught_and_named(make_tiny_model, mode, objective, measure):
    fp_model = make_tiny_model("llama")
    prepared = prepare_model(make_tiny_model("llama"), TransformConfig(placements("affine")), W4A4)
    broken = prepared.transforms["layers.1.pre_linear_attn"]
    with torch.no_grad():
        next(broken.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.self_attn\.q_proj") as caught:
        calibrate(prepared, fp_model, token_ids(2, 16, 0), quick_config(mode=mode, objective=objective, measure=measure), OptimConfig(), None)
    assert "layers.1.pre_linear_attn" in str(caught.value)


def test_exploding_condition_number_is_rolled_back_and_reported(make_tiny_model):
    fp_model = make_tiny_model("llama")
    prepared = prepare_model(make_tiny_model("llama"), TransformConfig(placements("affine")), W4A4)
    transforms = dict(prepared.transforms)
    start = {n: {k: v.clone() for k, v in t.state_dict().items()} for n, t in transforms.items()}
    with pytest.warns(RuntimeWarning, match="cond_limit"):
        report = calibrate(
            prepared, fp_model, token_ids(4, 16, 0), quick_config(cond_limit=1.0001), OptimConfig(lr=5e-2), None
        )
    assert report.rolled_back
    for name in report.rolled_back:
        for key, value in transforms[name].state_dict().items():
            assert torch.equal(value, start[name][key]), (name, key)
        assert transforms[name].condition_number() <= 1.0001


# --- options --------------------------------------------------------------------------------------


def test_learned_clipping_ratios_move_from_their_start_and_the_report_says_where_to(make_tiny_model):
    fp_model = make_tiny_model("llama")
    prepared = prepare_model(make_tiny_model("llama"), TransformConfig(placements("affine")), W4A4)
    report = calibrate(
        prepared, fp_model, token_ids(4, 16, 0), quick_config(learn_clipping=True), OptimConfig(lr=5e-2), None
    )
    q_proj = prepared.model.model.layers[0].self_attn.q_proj
    assert q_proj.weight_clip.shape == (q_proj.out_features, 1, 1)
    assert not torch.allclose(q_proj.weight_clip, torch.sigmoid(torch.tensor(4.0)))
    assert 0 < float(q_proj.act_clip) < 1
    weight, act = report.clipping["weight"], report.clipping["act"]
    assert 0 < weight["min"] <= float(q_proj.weight_clip.min()) <= float(q_proj.weight_clip.max()) <= weight["max"] < 1
    assert weight["min"] <= weight["mean"] <= weight["max"]
    assert act["min"] <= float(q_proj.act_clip) <= act["max"]
    assert weight["min"] < weight["max"]


@pytest.mark.parametrize("rtn_weights", [False, True])
def test_weight_clipping_is_learned_only_where_weights_are_quantized_while_learning(make_tiny_model, rtn_weights):
    # Under GPTQ the weights stay unquantized while learning unless calib.quantize_weights: a weight
    # ratio would get no gradient there, and GPTQ (which rounds with it) would clip by an unlearned 0.982.
    gptq = QuantConfig(weight_format="mxfp4", act_format="mxfp4", weight_quantizer="gptq")
    prepared = prepare_model(make_tiny_model("llama"), TransformConfig(placements("affine")), gptq)
    cfg = quick_config(learn_clipping=True, quantize_weights=rtn_weights, epochs=1)
    report = calibrate(prepared, make_tiny_model("llama"), token_ids(4, 16, 0), cfg, OptimConfig(lr=5e-2), None)
    q_proj = prepared.model.model.layers[0].self_attn.q_proj
    assert (q_proj.weight_clip is not None) == rtn_weights
    assert q_proj.act_clip is not None
    assert set(report.clipping) == ({"weight", "act"} if rtn_weights else {"act"})


def test_the_map_across_heads_before_o_proj_is_learned_with_its_block(make_tiny_model):
    # FlatQuant's o_trans (placement o_proj) belongs to its decoder block: layer-wise learning moves it,
    # and the learned model still quantizes o_proj's input through it.
    specs = placements("affine") | {"o_proj": {"family": "affine", "parametrization": "svd", "init": "random"}}
    prepared = prepare_model(model_with_outliers(make_tiny_model), TransformConfig(specs), W4A4)
    start = {name: t.matrix().detach().clone() for name, t in prepared.transforms.items() if name.endswith("o_proj")}
    assert set(start) == {"layers.0.o_proj", "layers.1.o_proj"}
    cfg = quick_config(mode="layer_wise", objective="block_mse", layer_inputs="full_precision", epochs=2)
    report = calibrate(prepared, model_with_outliers(make_tiny_model), token_ids(4, 16, 0), cfg, OptimConfig(lr=1e-2), None)
    for name, matrix in start.items():
        assert not torch.allclose(prepared.transforms[name].matrix(), matrix)
    o_proj = prepared.model.model.layers[0].self_attn.o_proj
    assert [t.transform for t in o_proj.online_in] == [prepared.transforms["layers.0.o_proj"]]
    assert {row["layer"] for row in report.per_layer} >= {"model.layers.0.self_attn.o_proj"}


@pytest.mark.parametrize("layer_inputs", ["quantized", "full_precision"])
def test_layer_wise_blocks_learn_on_the_stream_that_layer_inputs_names(make_tiny_model, monkeypatch, layer_inputs):
    # quantized: block 1 sees block 0 as quantized and learned; full_precision (FlatQuant): the FP model's
    # own block-1 input, whatever block 0 learned.
    from latmix.calibrate import learn
    from latmix.models import blocks

    seen = []
    train_block = learn._train_block
    monkeypatch.setattr(learn, "_train_block", lambda trainer, model, block, data, *rest: (
        seen.append(data[0].clone()), train_block(trainer, model, block, data, *rest))[1])
    fp_model, ids = model_with_outliers(make_tiny_model), token_ids(4, 16, 0)
    prepared = prepare_model(model_with_outliers(make_tiny_model), TransformConfig(placements("affine")), W4A4)
    cfg = quick_config(mode="layer_wise", objective="block_mse", layer_inputs=layer_inputs, measure=False)
    calibrate(prepared, fp_model, ids, cfg, OptimConfig(lr=1e-2), None)
    with torch.no_grad():
        x, kwargs = blocks.block_inputs(fp_model, ids)
        fp_stream = [x, blocks.run_block(blocks.decoder_layers(fp_model)[0], x, kwargs, 2)]
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], fp_stream[0])  # the embeddings: the same either way
    assert torch.allclose(seen[1], fp_stream[1], atol=1e-6) == (layer_inputs == "full_precision")


def test_bound_objective_lowers_the_bound(make_tiny_model):
    fp_model = model_with_outliers(make_tiny_model)
    prepared = prepare_model(model_with_outliers(make_tiny_model), TransformConfig(placements("affine")), W4A4)
    cfg = quick_config(mode="layer_wise", objective="bound", epochs=5)
    report = calibrate(prepared, fp_model, token_ids(4, 16, 0), cfg, OptimConfig(lr=1e-2), None)
    before = sum(row["bound_before"] for row in report.per_layer)
    after = sum(row["bound_after"] for row in report.per_layer)
    assert after < 0.9 * before


# --- optimizers -----------------------------------------------------------------------------------


def test_cayley_sgd_stays_on_the_stiefel_manifold_and_descends():
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    rotation = torch.nn.Parameter(q)
    shift = torch.nn.Parameter(torch.zeros(16))
    target = torch.eye(16)
    optimizer = build_optimizer([rotation, shift], OptimConfig(name="cayley_sgd", lr=0.1))
    losses = []
    for _ in range(30):
        loss = (rotation - target).pow(2).sum() + (shift - 1).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert torch.allclose(rotation.T @ rotation, torch.eye(16), atol=1e-5)
    assert losses[-1] < 0.5 * losses[0]
    assert torch.allclose(shift, torch.ones(16), atol=0.2)


def spinquant_sgdg_step(rotation: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """One step of SpinQuant's SGDG without momentum, written after its code (rows-first frame, the
    Cayley transform by fixed-point iteration), iterated to convergence instead of 5 times."""
    x = rotation.T
    v = -grad.T
    w_hat = v @ rotation - 0.5 * x @ (rotation @ (v @ rotation))
    w = w_hat - w_hat.T
    alpha = min(1.0 / (w.abs().sum(dim=0).max().item() + 1e-8), lr)
    y = x + alpha * v
    for _ in range(200):
        y = x + alpha * w @ (0.5 * (x + y))
    return y.T


@pytest.mark.parametrize("grad_scale", [1e-4, 1.0, 1e3])
def test_cayley_sgd_takes_spinquants_step_with_its_step_size_cap(grad_scale):
    # SpinQuant's step is min(lr, 1/||W||_1): at its lr of 1.5 a large gradient's step is capped, so
    # its size does not follow the gradient's scale; a small gradient takes the plain lr step.
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=torch.float64))
    grad = grad_scale * torch.randn(16, 16, generator=generator, dtype=torch.float64)
    rotation = torch.nn.Parameter(q.clone())
    optimizer = build_optimizer([rotation], OptimConfig(name="cayley_sgd", lr=1.5, momentum=0.0))
    rotation.grad = grad
    optimizer.step()
    assert torch.allclose(rotation.detach(), spinquant_sgdg_step(q, grad, 1.5), atol=1e-10)
    assert torch.allclose(rotation.T @ rotation, torch.eye(16, dtype=torch.float64), atol=1e-12)


def test_a_capped_cayley_step_moves_a_rotation_as_far_whatever_the_gradients_scale():
    generator = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator))
    grad = torch.randn(8, 8, generator=generator)
    moved = []
    for scale in (1.0, 100.0):
        rotation = torch.nn.Parameter(q.clone())
        rotation.grad = scale * grad
        build_optimizer([rotation], OptimConfig(name="cayley_sgd", lr=1.5, momentum=0.0)).step()
        moved.append(rotation.detach())
    assert torch.allclose(moved[0], moved[1], atol=1e-5)
    assert (moved[0] - q).abs().max() > 0.05


def test_cayley_sgd_leaves_a_rectangular_matrix_with_orthonormal_columns_to_plain_sgd():
    q, _ = torch.linalg.qr(torch.randn(8, 4, generator=torch.Generator().manual_seed(2)))
    tall = torch.nn.Parameter(q.clone())
    tall.grad = torch.ones_like(q)
    build_optimizer([tall], OptimConfig(name="cayley_sgd", lr=0.1, momentum=0.0)).step()
    assert torch.allclose(tall.detach(), q - 0.1)


@pytest.mark.parametrize(("parametrization", "raw_parameter"), [("stiefel", "weight"), ("exp", "original")])
def test_spinquant_moves_the_rotation_itself_along_the_orthogonal_group_and_lowers_the_kl(
    make_tiny_model, parametrization, raw_parameter
):
    # SpinQuant's way (stiefel): Cayley SGD's parameter is the rotation R1 itself. The exp
    # parametrization's parameter is the raw X of Q0 exp(skew X), which Cayley SGD would hold orthogonal.
    spec = {"family": "rotation", "init": "hadamard", "learnable": True, "parametrization": parametrization}
    rtn = QuantConfig(weight_format="mxfp4", act_format="mxfp4")
    prepared = prepare_model(model_with_outliers(make_tiny_model), TransformConfig({"residual": spec}), rtn)
    residual = prepared.transforms["residual"]  # calibration folds it into the weights and drops it
    (name, start), = [(n, p.detach().clone()) for n, p in residual.named_parameters()]
    assert name.endswith(raw_parameter)
    report = calibrate(prepared, model_with_outliers(make_tiny_model), token_ids(4, 16, 0), quick_config(),
                       OptimConfig(name="cayley_sgd", lr=1.5), None)
    q = residual.matrix().detach()
    assert torch.allclose(q.T @ q, torch.eye(q.shape[0]), atol=1e-5)
    assert report.loss_after < report.loss_before
    if parametrization == "stiefel":
        assert (q - start).abs().max() > 1e-3


def test_the_ce_objective_is_the_language_modelling_loss_of_the_calibration_text(make_tiny_model):
    model = make_tiny_model("llama")
    ids = token_ids(2, 16, 0)
    with torch.no_grad():
        assert next_token_ce(model(ids).logits, ids).item() == pytest.approx(model(ids, labels=ids).loss.item(), rel=1e-6)


def test_learning_on_the_ce_objective_lowers_the_quantized_models_loss_on_its_text(make_tiny_model):
    spec = {"family": "rotation", "init": "hadamard", "learnable": True, "parametrization": "stiefel"}
    rtn = QuantConfig(weight_format="mxfp4", act_format="mxfp4")
    prepared = prepare_model(model_with_outliers(make_tiny_model), TransformConfig({"residual": spec}), rtn)
    ids = token_ids(4, 16, 0)
    with torch.no_grad():
        before = next_token_ce(prepared.model(ids).logits, ids).item()
    calibrate(prepared, model_with_outliers(make_tiny_model), ids, quick_config(objective="ce"),
              OptimConfig(name="cayley_sgd", lr=1.5, momentum=0.0), None)
    with torch.no_grad():
        assert next_token_ce(prepared.model(ids).logits, ids).item() < before


def test_learning_rate_schedule_depends_on_the_step_alone():
    cosine = OptimConfig(warmup=2)
    assert lr_factor(0, 10, cosine) == pytest.approx(1 / 3)
    assert lr_factor(2, 10, cosine) == pytest.approx(1.0)
    assert lr_factor(10, 10, cosine) == pytest.approx(0.0)
    assert lr_factor(7, 10, OptimConfig(schedule="constant")) == 1.0


@pytest.mark.parametrize("clip_lr", [None, 0.5])
def test_learned_clipping_logits_follow_optim_clip_lr_on_the_same_schedule(clip_lr):
    # The clipping logits start saturated (sigmoid(4)); optim.clip_lr lets a few steps move them
    # without moving the maps faster. Adam's first step is lr in size whatever the gradient's.
    params = {
        "residual.scale": torch.nn.Parameter(torch.zeros(3)),
        "model.layers.0.mlp.up_proj.parametrizations.weight_clip.original": torch.nn.Parameter(torch.full((2,), 4.0)),
    }
    cfg = OptimConfig(lr=1e-3, clip_lr=clip_lr)
    optimizer = build_optimizer(param_groups(params, cfg), cfg)
    set_lr(optimizer, 0, 4, cfg)
    for p in params.values():
        p.grad = torch.ones_like(p)
    optimizer.step()
    scale, clip = params.values()
    assert torch.allclose(scale, torch.full((3,), -1e-3), atol=1e-6)
    assert torch.allclose(clip, torch.full((2,), 4.0 - (clip_lr or 1e-3)), atol=1e-5)
    set_lr(optimizer, 2, 4, cfg)  # halfway down the cosine: both at half their own rate
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx(
        [0.5e-3] if clip_lr is None else [0.5e-3, 0.5 * clip_lr]
    )
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(param_groups({}, cfg), cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "adam"}, "optim.name='adam'"),
        ({"lr": 0.0}, "optim.lr"),
        ({"clip_lr": 0.0}, "optim.clip_lr"),
        ({"grad_clip": -1.0}, "grad_clip"),
    ],
)
def test_bad_optimizer_settings_say_what_to_change(overrides, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**overrides)


# --- cost: nothing to learn, nothing calibrated; measured once, cheaply -----------------------------


def test_mode_none_is_skipped_and_measured_once(make_tiny_model, monkeypatch):
    import latmix.calibrate.learn as learn

    snapshots = []
    snapshot = learn.snapshot
    monkeypatch.setattr(learn, "snapshot", lambda *args: snapshots.append(1) or snapshot(*args))
    prepared = prepare_model(make_tiny_model("llama"), TransformConfig(placements("affine")), W4A4)
    report = calibrate(
        prepared, make_tiny_model("llama"), token_ids(2, 16, 0), quick_config(mode="none"), OptimConfig(), None
    )
    assert report.skipped == "calib.mode=none" and report.steps == 0 and len(snapshots) == 1
    assert report.per_layer and report.loss_before == report.loss_after
    assert 0 < report.measure_seconds < report.seconds and report.as_record()["measure_seconds"] == report.measure_seconds


@pytest.mark.parametrize(
    ("quant", "family", "reason"),
    [
        (QuantConfig(), "affine", "nothing is quantized (quant has no"),
        (QuantConfig(weight_format="mxfp4", weight_quantizer="gptq"), "affine", "the weights wait for GPTQ"),
        (W4A4, "hadamard", "no learnable parameter"),
    ],
)
def test_nothing_to_learn_is_skipped_and_says_why(make_tiny_model, caplog, quant, family, reason):
    ids = token_ids(2, 16, 0)
    reference = Reference.of(make_tiny_model("llama"), ids)
    prepared = prepare_model(make_tiny_model("llama"), TransformConfig(placements(family)), quant)
    with caplog.at_level("INFO", logger="latmix.calibrate.learn"):
        report = calibrate(prepared, make_tiny_model("llama"), ids, quick_config(), OptimConfig(), None)
    assert report.skipped is not None and reason in report.skipped and report.steps == 0
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == f"calibration skipped: {report.skipped}"
    assert all(m.startswith("measured the bound and error") and "once: nothing learned" in m for m in messages[1:])
    assert report.as_record()["skipped"] == report.skipped
    if quant.weight_format is None:  # quant=none: no measurement, and the function is untouched
        assert report.per_layer == [] and report.loss_before is None
        assert deviation(prepared.model, reference)["max_rel_logit_error"] < 1e-5


def test_calibrate_can_leave_measuring_out(make_tiny_model):
    prepared = prepare_model(make_tiny_model("llama"), TransformConfig(placements("affine")), W4A4)
    cfg = quick_config(measure=False, epochs=1)
    report = calibrate(prepared, make_tiny_model("llama"), token_ids(2, 16, 0), cfg, OptimConfig(), None)
    assert report.steps == 1 and report.per_layer == [] and report.loss_before is None
    assert report.measure_seconds is None


@pytest.mark.parametrize(
    "placements",
    [
        {
            "pre_linear": {"family": "affine", "parametrization": "block_diag", "block_size": 16, "init": "block_hadamard"},
            "attn_vo": {"family": "affine", "parametrization": "qr", "shift": True},
            "o_proj": {"family": "affine", "parametrization": "svd", "init": "random"},
            "down_proj": {"family": "affine", "parametrization": "kronecker", "init": "hadamard", "premix": "hadamard"},
        },
        {
            "residual": {"family": "hadamard"},
            "pre_linear": {"family": "affine", "parametrization": "lu"},
            "down_proj": {"family": "block_hadamard", "block_size": 16},
        },
    ],
)
def test_structured_measurement_matches_the_dense_inverse(make_tiny_model, placements):
    # Each point's error is measured through its map's own structure (or with no product at all for
    # orthogonal chains); it must equal the dense float64 A^-1 of the composite matrix, bound included.
    from latmix.bound import bound_of_transformed, error_of_transformed, inverse_spectral_norm
    from latmix.calibrate.measure import _composite_matrix, _inverse_and_conditioning, quant_points

    prepared = prepare_model(make_tiny_model("llama"), TransformConfig(placements), W4A4)
    with torch.no_grad():
        for t in prepared.transforms.values():  # move every map off its start
            for p in t.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    for _, _, linear in quant_points(prepared.model):
        y = torch.randn(64, linear.in_features, generator=torch.Generator().manual_seed(3)) * 3
        inv_norm, A_inv, cond = _inverse_and_conditioning(linear)
        A = _composite_matrix(linear)
        A = torch.eye(linear.in_features, dtype=torch.float64) if A is None else A.detach().double()
        sigma = torch.linalg.svdvals(A)
        assert inv_norm == pytest.approx(float(inverse_spectral_norm(A)), rel=1e-6)
        assert cond == pytest.approx(float(sigma.max() / sigma.min()), rel=1e-6)
        dense = error_of_transformed(y, torch.linalg.inv(A), "mxfp4")
        assert float(error_of_transformed(y, A_inv, "mxfp4")) == pytest.approx(float(dense), rel=1e-5)
        assert float(bound_of_transformed(y, inv_norm, "mxfp4")) >= float(dense)


@pytest.mark.parametrize(
    ("placements", "approximate"),
    [
        (
            {
                "residual": {"family": "affine", "init": "hadamard"},
                "attn_vo": {"family": "affine", "init": "hadamard", "shift": True},
                "down_proj": {"family": "hadamard"},
            },
            True,
        ),
        (
            {
                "pre_linear": {
                    "family": "affine", "parametrization": "block_diag", "block_size": 16,
                    "init": "block_hadamard", "shift": True,
                },
                "attn_vo": {"family": "affine", "parametrization": "block_diag", "block_size": 16},
                "o_proj": {"family": "affine", "parametrization": "qr", "init": "random", "shift": True},
                "down_proj": {"family": "affine", "parametrization": "kronecker", "init": "hadamard"},
            },
            False,
        ),
        (
            {
                "residual": {"family": "rotation", "init": "hadamard", "learnable": True},
                "attn_vo": {"family": "rotation", "learnable": True},
                "down_proj": {"family": "block_hadamard", "block_size": 16},
            },
            False,
        ),
    ],
)
@pytest.mark.parametrize("every_map_online", [False, True])
def test_maps_on_activations_compute_the_folded_function_and_gradients(
    make_tiny_model, input_ids, placements, approximate, every_map_online, monkeypatch
):
    # While the weights wait for GPTQ, cheap maps act on the activations instead of being folded into
    # the weights: the logits and every transform parameter's gradient must match the folded computation.
    from latmix.quantize import QuantLinear, maps_on_activations

    torch.manual_seed(0)
    prepared = prepare_model(
        make_tiny_model("llama"),
        TransformConfig(placements, approximate=approximate),
        QuantConfig(weight_format="mxfp4", act_format="mxfp4", weight_quantizer="gptq"),
    )
    model = prepared.model
    with torch.no_grad():
        for t in prepared.transforms.values():
            for p in t.parameters():
                if p.dim() < 2 or p.shape[-1] != p.shape[-2]:
                    p.add_(0.05 * torch.randn(p.shape))
    if every_map_online:  # the tiny model's sizes keep a dense T1 folded; put every map online too
        monkeypatch.setattr(QuantLinear, "_online_pays", lambda self, transform, tokens, output_map: True)
    params = [p for t in prepared.transforms.values() for p in t.parameters() if p.requires_grad]

    def run(online: bool):
        for p in params:
            p.grad = None
        with maps_on_activations(model) if online else contextlib.nullcontext():
            logits = model(input_ids).logits
        logits.float().pow(2).mean().backward()
        return logits.detach(), [p.grad.clone() for p in params]

    folded, folded_grads = run(False)
    online, online_grads = run(True)
    assert not any(m.online_maps for m in model.modules() if isinstance(m, QuantLinear))
    # The activation quantizer sees the same operands; the GEMMs round differently, and one rounding
    # difference can flip an MX element, so compare with a tolerance.
    assert torch.allclose(online, folded, rtol=1e-3, atol=1e-3 * folded.abs().max())
    for g_online, g_folded in zip(online_grads, folded_grads, strict=True):
        assert torch.allclose(g_online, g_folded, rtol=1e-2, atol=1e-3 * g_folded.abs().max() + 1e-8)


def test_the_fp_reference_runs_only_the_lm_head_after_the_first_epoch(make_tiny_model):
    from latmix.calibrate.learn import _FPReference

    fp_model = make_tiny_model("llama_tied")
    ids = token_ids(6, 16, 0)
    reference = _FPReference(fp_model, ids)
    first = reference.logits(torch.tensor([4, 1, 3]))
    assert sorted(reference.hidden) == [1, 3, 4]
    calls = []
    handle = fp_model.model.register_forward_pre_hook(lambda *args: calls.append(1))
    again = reference.logits(torch.tensor([3, 4, 1]))
    handle.remove()
    assert calls == [] and torch.equal(again, first[[2, 0, 1]])
    mixed = reference.logits(torch.tensor([0, 4]))  # one new sequence runs the model for it alone
    with torch.no_grad():
        full = fp_model(ids[[0, 4]]).logits
    assert torch.equal(mixed, full)


def test_quantize_weights_learns_against_rtn_weights_and_restores_the_switches(make_tiny_model):
    from latmix.quantize import QuantLinear

    quant = QuantConfig(weight_format="mxfp4", weight_quantizer="gptq")
    prepared = prepare_model(make_tiny_model("llama"), TransformConfig(placements("affine")), quant)
    linears = [m for m in prepared.model.modules() if isinstance(m, QuantLinear) and m.weight_format]
    seen = []
    cfg = quick_config(quantize_weights=True, epochs=1)
    report = calibrate(
        prepared, make_tiny_model("llama"), token_ids(2, 16, 0), cfg, OptimConfig(), None,
        on_step=lambda progress: seen.append(all(m.quantize_weights for m in linears)),
    )
    assert report.skipped is None and report.steps == 1 and seen == [True]
    assert not any(m.quantize_weights for m in linears)
    assert report.loss_before > 0  # measured against the RTN weights


@pytest.mark.parametrize("family", ["hadamard", "rotation"])
def test_block_losses_compare_with_the_fp_blocks_mapped_into_the_model_basis(make_tiny_model, family):
    # One FP forward serves every snapshot: its block outputs, mapped by the (here fixed, folded) T1,
    # are the transformed model's own unquantized block outputs.
    from latmix.calibrate.measure import block_outputs
    from latmix.losses import block_mse
    from latmix.quantize import quantization_disabled

    ids = token_ids(4, 16, 0)
    prepared = prepare_model(make_tiny_model("llama"), TransformConfig({"residual": {"family": family}}), W4A4)
    report = calibrate(prepared, make_tiny_model("llama"), ids, quick_config(mode="none"), OptimConfig(), None)
    quantized, _ = block_outputs(prepared.model, ids)
    with quantization_disabled(prepared.model):
        unquantized, _ = block_outputs(prepared.model, ids)
    expected = [float(block_mse(q, r)) for q, r in zip(quantized, unquantized, strict=True)]
    measured = [next(r["loss_before"] for r in report.per_layer if r["block"] == b) for b in range(2)]
    assert measured == pytest.approx(expected, rel=1e-4)
