"""Export: MX codes that decode to the exported weights exactly, and a reloaded model that reproduces the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from latmix import export, mx
from latmix.settings import EvalSettings, from_values

ROOT = Path(__file__).resolve().parent.parent
E8M0_FORMATS = ["mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2", "mxint8"]


def mx_values(fmt: str, rows: int = 16, cols: int = 128, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=generator) * torch.logspace(-3, 3, rows)[:, None]
    x[0, :32] = 0.0  # an all-zero block
    x[1, 5] = 1e4  # an outlier
    return mx.quantize(x, fmt, 32)


@pytest.mark.parametrize("fmt", E8M0_FORMATS)
def test_codes_and_scales_decode_to_the_quantized_values_exactly(fmt):
    q = mx_values(fmt)
    codes, scales = export.encode_mx(q, fmt, 32)
    assert codes.dtype == scales.dtype == torch.uint8
    assert codes.shape == (16, 64 if fmt == "mxfp4" else 128)  # FP4: two codes per byte along K
    assert scales.shape == (16, 4)
    assert torch.equal(export.decode_mx(codes, scales, fmt, 32), q)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8_e4m3", "mxint8"])
def test_blocks_gptq_shrank_after_their_scale_was_fixed_still_encode(fmt):
    q = mx_values(fmt, seed=1)
    blocks = q.view(16, 4, 32)
    largest = blocks.abs().argmax(dim=-1, keepdim=True)
    shrunk = blocks.scatter(-1, largest, 0.0).view(16, 128)  # still values of the original scales' grid
    codes, scales = export.encode_mx(shrunk, fmt, 32)
    assert torch.equal(export.decode_mx(codes, scales, fmt, 32), shrunk)


def test_the_e8m0_scale_of_a_plain_block_is_the_quantizers():
    q = mx.quantize(torch.tensor([[3.0] + [0.1] * 31]), "mxfp4", 32)  # amax 3: scale 2^(1 - 2)
    _, scales = export.encode_mx(q, "mxfp4", 32)
    assert scales.tolist() == [[127 - 1]]


def test_nvfp4_has_no_e8m0_codes():
    assert export.encode_mx(mx.quantize(torch.randn(4, 32), "nvfp4", 16), "nvfp4", 16) is None


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["model=tiny", *overrides])


SETTINGS = {
    # LATMiX, the default: smoothed block-diagonal maps online before the linears, folded between v and o
    # (32-blocks there: the tiny checkpoint's heads are 32 wide).
    "affine": ["transform=affine", "transform.placements.attn_vo.block_size=32", "quant.weight_quantizer=rtn"],
    # LATMiX, the literal reading: residual T1 folded, T2 with a shift (o_proj gains a bias Llama has no
    # slot for), Hadamard before down.
    "affine_literal": ["transform=affine_literal", "quant.weight_quantizer=rtn"],
    # QuaRot with GPTQ and a quantized KV cache: q/k rotated after RoPE inside attention.
    "hadamard_kv": ["transform=hadamard", "quant.weight_quantizer=gptq", "quant.kv_format=mxfp8"],
    # FlatQuant: learned online Kronecker maps before every linear, learned activation clipping.
    "flatquant": ["transform=flatquant", "quant.weight_quantizer=rtn", "calib.learn_clipping=true"],
    # FlatQuant's own recipe: Kronecker maps after learned per-channel scales, weight and activation clipping,
    # and its map across the heads before o_proj (o_trans).
    "flatquant_recipe": ["transform=flatquant_recipe", "+ablation=o_proj", "quant.weight_quantizer=gptq"],
}


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_the_reloaded_model_reproduces_the_records_perplexity_exactly(tiny_checkpoint, tmp_path, setting):
    from latmix.evaluate import evaluate
    from latmix.experiment import run

    rec = run(compose_run(
        f"model.name_or_path={tiny_checkpoint}", f"paths.results_dir={tmp_path}", "logger=none", "export=true",
        "calib.n_samples=4", "calib.seq_len=64", "calib.batch_size=2", "calib.steps=2",
        "eval=quick", "eval.max_seq_len=128", "eval.max_ppl_tokens=1024", "eval.tasks=[]", *SETTINGS[setting],
    ))
    path = tmp_path / "export" / rec["run_id"]
    assert {"config.json", "model.safetensors", "tokenizer.json", export.MANIFEST, export.SIDECAR, export.CODES} <= {
        p.name for p in path.iterdir()}
    assert "export" in rec["timing"]

    loaded = export.load_quantized(path)
    settings = from_values(EvalSettings, dict(rec["config"]["eval"]), "eval")
    assert evaluate(loaded.model, loaded.tokenizer, settings).ppl == rec["metrics"]["ppl"]  # exactly

    manifest = json.loads((path / export.MANIFEST).read_text())
    linears = manifest["linears"]
    if setting == "affine":
        assert linears["model.layers.0.self_attn.q_proj"]["online_in"] == ["layers.0.pre_linear_attn"]
        assert manifest["transforms"]["layers.0.pre_linear_attn"]["family"] == "affine"
    if setting == "affine_literal":
        assert linears["model.layers.0.self_attn.o_proj"]["bias"] == "latmix"
        assert linears["model.layers.0.mlp.down_proj"]["online_in"] == ["layers.0.down_proj"]
    if setting == "hadamard_kv":
        assert manifest["attention"]["model.layers.0.self_attn"]["qk"] == "layers.0.qk"
        assert manifest["attention"]["model.layers.0.self_attn"]["kv_format"] == "mxfp8"
    if setting.startswith("flatquant"):
        assert linears["model.layers.0.self_attn.q_proj"]["act_clip"]
        assert manifest["transforms"]["layers.0.pre_linear_attn"]["family"] == "affine"
    if setting == "flatquant_recipe":
        assert linears["model.layers.0.self_attn.o_proj"]["online_in"] == ["layers.0.o_proj"]
        assert manifest["transforms"]["layers.0.o_proj"]["dim"] == 2  # the tiny checkpoint's heads
        assert manifest["transforms"]["layers.0.o_proj"]["across_heads"] == 32
    # The MX codes decode to the checkpoint's weights.
    weights, codes = load_file(str(path / "model.safetensors")), load_file(str(path / export.CODES))
    name = "model.layers.1.mlp.up_proj"
    entry = linears[name]
    decoded = export.decode_mx(codes[f"{name}.codes"], codes[f"{name}.scales"], entry["weight_format"],
                               entry["weight_block_size"])
    assert torch.equal(decoded, weights[f"{name}.weight"].float())
    # The learned transforms of the run are kept as a safetensors file (none for the fixed Hadamard maps).
    learned = tmp_path / "transforms" / f"{rec['run_id']}.safetensors"
    assert learned.exists() == (setting != "hadamard_kv")
