"""scripts/sensitivity.py: quantization switched on at exactly one place at a time, and its statistics."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import load_script

from latmix import evaluate, mx
from latmix.config import compose_experiment
from latmix.formats import get_format
from latmix.quantize import QuantLinear, prepare_model
from latmix.settings import LINEAR_ROLES, QuantConfig, TransformConfig

sensitivity = load_script("sensitivity")
SEQ_LEN = 16


@pytest.fixture
def prepared(tiny_llama):
    fp_model = copy.deepcopy(tiny_llama)
    quant = QuantConfig(weight_format="mxfp8", act_format="mxfp8", block_size=32)
    return prepare_model(tiny_llama, TransformConfig(), quant), fp_model


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (4 * SEQ_LEN,), generator=torch.Generator().manual_seed(3))


def _switches(model) -> dict[str, tuple[bool, bool]]:
    return {n: (m.quantize_weights, m.quantize_acts) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_places_cover_every_role_and_block_once(prepared):
    places = sensitivity.places(prepared[0])
    keys = [p.key for p in places]
    assert len(keys) == len(set(keys))
    expected = {f"all/{s}" for s in sensitivity.SIDES}
    expected |= {f"{r}/{s}" for r in LINEAR_ROLES for s in sensitivity.SIDES}
    expected |= {f"block {i}/{s}" for i in range(2) for s in ("weights", "acts")}
    expected |= {"all but token 0/acts", "all but token 0/both"}
    expected |= {f"all, no-clip scale/{s}" for s in sensitivity.SIDES}
    assert set(keys) == expected
    by_key = {p.key: p for p in places}
    assert len(by_key["all/both"].linears) == 2 * len(LINEAR_ROLES)
    assert len(by_key["up/acts"].linears) == 2 and len(by_key["block 1/weights"].linears) == len(LINEAR_ROLES)
    assert sensitivity.places(prepared[0], ["role"])[0].kind == "role"
    cells = sensitivity.places(prepared[0], [], [(1, "acts")])
    assert [p.key for p in cells] == [f"1.{r}/acts" for r in LINEAR_ROLES]
    assert cells[-1].linears == (by_key["block 1/acts"].linears[-1],)


def test_switched_on_quantizes_exactly_one_place_and_restores(prepared):
    model = prepared[0].model
    before = _switches(model)
    assert all(flags == (True, True) for flags in before.values())  # RTN W8A8 as prepared
    place = {p.key: p for p in sensitivity.places(prepared[0])}["down/acts"]
    with sensitivity.switched_on(model, place):
        on = {n: flags for n, flags in _switches(model).items() if flags != (False, False)}
        assert on == {"model.layers.0.mlp.down_proj": (False, True), "model.layers.1.mlp.down_proj": (False, True)}
    assert _switches(model) == before
    with sensitivity.switched_on(model, None):
        assert all(flags == (False, False) for flags in _switches(model).values())
    assert _switches(model) == before


@torch.no_grad()
def test_keep_first_leaves_the_first_token_unquantized_and_the_rest_as_the_linear_would(prepared, ids):
    handle = prepared[0]
    model, by_key = handle.model, {p.key: p for p in sensitivity.places(handle)}
    batch = ids.view(-1, SEQ_LEN)[:2]
    with sensitivity.switched_on(model, None):
        fp = model(batch).logits
    with sensitivity.switched_on(model, by_key["all/acts"]):
        every = model(batch).logits
    with sensitivity.switched_on(model, by_key["all but token 0/both"]):  # the hook quantizes instead
        assert all(m.quantize_weights and not m.quantize_acts for m in by_key["all/both"].linears)
    with sensitivity.switched_on(model, by_key["all but token 0/acts"]):
        kept = model(batch).logits
    # position 0 sees only itself: exactly full precision when its activations are kept
    assert torch.equal(kept[:, 0], fp[:, 0]) and not torch.equal(every[:, 0], fp[:, 0])
    assert not torch.allclose(kept[:, 1:], fp[:, 1:])
    # with nothing kept the hook quantizes exactly as the linear does
    linear = by_key["all/acts"].linears[0]
    x = torch.randn(2, SEQ_LEN, linear.in_features)
    hooked = sensitivity._quantize_input(0, False)(linear, (x,))[0]
    with sensitivity.switched_on(model, by_key["all/acts"]):
        assert torch.equal(hooked, linear.gemm_input(x))
    assert torch.equal(sensitivity._quantize_input(1, False)(linear, (x,))[0][:, 0], x[:, 0])


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_quantize_unclipped_rounds_the_scale_up_only_where_the_block_max_saturates(fmt):
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    fmt = get_format(fmt)
    ocp, up = mx.quantize(x, fmt, 32), sensitivity.quantize_unclipped(x, fmt, 32)
    amax = x.reshape(64, 4, 32).abs().amax(-1)
    mantissa = amax / torch.exp2(torch.floor(torch.log2(amax)))
    saturates = mantissa > fmt.element.max_normal / 2.0**fmt.element.emax
    assert 0 < saturates.float().mean() < 1
    same = ~saturates[..., None].expand(64, 4, 32).reshape(64, 128)
    assert torch.equal(up[same], ocp[same])
    # where the OCP scale clips the block max, the rounded-up scale keeps it within half a step
    top = x.abs() == amax.repeat_interleave(32, -1)
    assert ((up - x).abs()[top & ~same] <= x.abs()[top & ~same] * 2.0**-fmt.element.mbits).all()
    assert ((ocp - x).abs()[top & ~same] >= (up - x).abs()[top & ~same]).all()
    assert (ocp - x).abs()[top & ~same].sum() > 2 * (up - x).abs()[top & ~same].sum()
    assert sensitivity.quantize_unclipped(torch.tensor([[1.9] + [0.5] * 31]), get_format("mxfp8"), 32)[0, 0] == 1.875


@torch.no_grad()
def test_no_clip_place_swaps_weights_back_and_differs_from_the_ocp_scale(prepared, ids):
    handle = prepared[0]
    model, by_key = handle.model, {p.key: p for p in sensitivity.places(handle)}
    batch = ids.view(-1, SEQ_LEN)[:2]
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with sensitivity.switched_on(model, by_key["all/both"]):
        ocp = model(batch).logits
    with sensitivity.switched_on(model, by_key["all, no-clip scale/both"]):
        assert all(not m.quantize_weights and not m.quantize_acts for m in by_key["all/both"].linears)
        up = model(batch).logits
    assert not torch.allclose(up, ocp)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert _switches(model) == {n: (True, True) for n in _switches(model)}


def test_sweep_full_precision_equals_original_and_each_place_changes_only_itself(prepared, ids):
    handle, fp_model = prepared
    places = [p for p in sensitivity.places(handle) if p.key in ("all/both", "q/weights", "block 0/acts")]
    seen = []
    fp, ppl = sensitivity.sweep(handle.model, ids, SEQ_LEN, 2, places, on_point=lambda key, *_: seen.append(key))
    assert fp == pytest.approx(evaluate.perplexity(fp_model, ids, SEQ_LEN, 2), rel=1e-6)
    assert seen == ["fp", "all/both", "q/weights", "block 0/acts"]
    assert all(value != fp for value in ppl.values())
    # points already measured are not measured again
    again = []
    sensitivity.sweep(handle.model, ids, SEQ_LEN, 2, places, done={"fp": fp, **ppl},
                      on_point=lambda key, *_: again.append(key))
    assert again == []


def test_mx_sums_counts_clipping_flushing_and_subnormals():
    block = torch.full((32,), 0.5)
    block[0] = 1.9      # block max 1.9: X = 2^(0 - 8), 1.9 / X = 486 > 448 clips
    block[1] = 2.0**-20  # below half the smallest subnormal X * 2^-9 = 2^-17: flushed to zero
    block[2] = 2.0**-16  # below the smallest normal X * 2^-6 = 2^-14: subnormal, kept
    sums = sensitivity.mx_sums(block[None], get_format("mxfp8"), 32)
    assert (sums["blocks"], sums["clip_blocks"], sums["clipped"], sums["zeroed"], sums["subnormal"]) == (1, 1, 1, 1, 2)
    rates = sensitivity.ratios(sums)
    assert rates["err_share_clipped"] > 0.99  # 1.9 -> 1.75 dwarfs the rest (0.5 is exact)
    assert rates["rel_err"] == pytest.approx(0.15 / (1.9**2 + 29 * 0.25) ** 0.5, rel=1e-3)


def test_report_has_a_row_per_place_sorted_and_statistics(prepared, ids):
    handle = prepared[0]
    places = [p for p in sensitivity.places(handle) if p.kind == "all" or p.name == "down"]
    fp, ppl = sensitivity.sweep(handle.model, ids, SEQ_LEN, 2, places)
    names = sensitivity.linear_names(handle)
    acts = sensitivity.activation_stats(handle.model, ids, SEQ_LEN, 2, names)
    weights = {n: sensitivity.weight_stats(m) for n, m in names.items()}
    assert set(acts) == set(weights) == {f"{i}.{r}" for i in range(2) for r in LINEAR_ROLES}
    by_id = {id(m): n for n, m in names.items()}
    rows = [{"key": p.key, "place": p.name, "kind": p.kind, "side": p.side, "ppl": ppl[p.key],
             "increase": ppl[p.key] / fp - 1, "share": 0.0, "stats": sensitivity.place_stats(p, by_id, acts, weights)}
            for p in places]
    result = {"model": "tiny", "quant": "mxfp8", "transform": "identity", "tokens": ids.numel(), "text": "random",
              "seq_len": SEQ_LEN, "fp_ppl": fp, "rows": rows,
              "gaussian": sensitivity.ratios(sensitivity.mx_sums(torch.randn(64, 64), get_format("mxfp8"), 32))}
    text = sensitivity.report(result)
    table = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == len(places)
    ppls = [float(line.split("|")[4]) for line in table]
    assert ppls == sorted(ppls, reverse=True)
    assert "Activations at the worst places" in text and "Weights at the worst places" in text
    # the first token's statistics against the other tokens', per role
    assert all(acts[n]["first_sums"]["elements"] == 2 * 1 * m.in_features * 2 for n, m in names.items())
    positions = sensitivity.by_position(acts)
    assert set(positions) == set(LINEAR_ROLES)
    first, rest = positions["down"]["first"], positions["down"]["rest"]
    assert 0 < first["rel_err"] < 0.1 and 0 < rest["rel_err"] < 0.1 and first["max_abs"] > 0
    assert "Activations by position" in sensitivity.report(result | {"positions": positions})


@pytest.mark.slow
def test_run_writes_markdown_and_json_and_resumes(tmp_path):
    overrides = ["model=tiny", "quant=mxfp8", "transform=identity", "eval=quick", "eval.max_ppl_tokens=512",
                 "logger=none", "device=cpu"]
    out = tmp_path / "tiny-mxfp8"
    result = sensitivity.run(compose_experiment(overrides), ["all", "first"], out, False, "cmd")
    keys = ["all/both", "all/weights", "all/acts", "all but token 0/acts", "all but token 0/both"]
    assert [r["key"] for r in result["rows"]] == keys
    assert set(result["seconds"]) == {"fp", *keys}
    assert set(result["positions"]) == set(LINEAR_ROLES)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["ppl"] == pytest.approx(result["ppl"]) and saved["command"] == "cmd"
    assert len(saved["linears"]) == 4 * len(LINEAR_ROLES)  # the embedded tiny model has 4 blocks
    markdown = out.with_suffix(".md").read_text()
    assert "| 1 | all |" in markdown and "Activations by position" in markdown
    resumed = sensitivity.run(compose_experiment(overrides), ["all", "first"], out, True, "cmd")
    # nothing measured again: the earlier points keep their times, and the JSON says what was resumed
    assert resumed["seconds"] == result["seconds"] and resumed["ppl"] == pytest.approx(result["ppl"])
    assert resumed["resumed"] == sorted(result["ppl"])
