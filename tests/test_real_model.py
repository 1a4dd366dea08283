"""SmolLM2-135M, the real model of `model=smollm2-135m` (built by `make test`'s set-up): the surgery and
the quantizers on a pretrained Llama with tied embeddings and massive activations, not a toy.

Measured on a short slice of the shipped held-out text (REAL_TOKENS tokens, windows of WINDOW): enough
to tell MXFP8 from MXFP4 and GPTQ from round-to-nearest by far more than the noise of the slice.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from latmix.config import build_experiment
from latmix.data import calibration_batches
from latmix.evaluate import perplexity, perplexity_stream
from latmix.gptq import gptq_quantize_model
from latmix.models import cache
from latmix.models.loading import load_model
from latmix.quantize import prepare_model, set_quantization

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TRANSFORMS = sorted(p.stem for p in (ROOT / "conf" / "transform").glob("*.yaml"))
WINDOW = 256
REAL_TOKENS = 4 * WINDOW


def experiment(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return build_experiment(compose("config", overrides=["model=smollm2-135m", "logger=none", *overrides]))


@pytest.fixture(scope="module")
def smollm2():
    path, _ = cache.cached_model("smollm2-135m")
    model, tokenizer = load_model(str(path), "float32", "cuda" if torch.cuda.is_available() else "cpu")
    model.requires_grad_(False)
    text = perplexity_stream(tokenizer, "heldout")[:REAL_TOKENS]
    return model, tokenizer, text, perplexity(model, text, WINDOW)


def quantized_ppl(smollm2, *overrides: str, gptq: bool = False) -> float:
    model, tokenizer, text, _ = smollm2
    exp = experiment(*overrides)
    prepared = prepare_model(copy.deepcopy(model), exp.transform, exp.quant)
    if gptq:
        calib_ids, _ = calibration_batches(tokenizer, "local", 8, WINDOW, 0)
        gptq_quantize_model(prepared, calib_ids, exp.quant, exp.gptq)
    set_quantization(prepared.model, weights=exp.quant.weight_format is not None, acts=exp.quant.act_format is not None)
    return perplexity(prepared.model, text, WINDOW)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_every_transform_preset_keeps_the_real_models_perplexity(smollm2, transform):
    # Every placement of every preset, at its initialisation (random rotations, Hadamards, affine maps
    # with their shifts), unquantized: the function of the pretrained model, tied embeddings included.
    *_, fp = smollm2
    placed = quantized_ppl(smollm2, "quant=none", f"transform={transform}", "calib.mode=none")
    assert abs(placed / fp - 1) < 1e-4, (transform, placed, fp)


def test_mxfp8_costs_less_than_mxfp4_and_both_cost_something(smollm2):
    *_, fp = smollm2
    mxfp8 = quantized_ppl(smollm2, "quant=mxfp8", "transform=identity", "quant.weight_quantizer=rtn")
    mxfp4 = quantized_ppl(smollm2, "quant=mxfp4", "transform=identity", "quant.weight_quantizer=rtn")
    assert fp < mxfp8 < 1.25 * fp < 2 * fp < mxfp4, (fp, mxfp8, mxfp4)


def test_gptq_beats_round_to_nearest_on_mxfp4_weights(smollm2):
    # W4A16: the weight quantizer alone decides (block-Hadamard in front, as the methods use it).
    common = ("quant=mxfp4", "quant.act_format=null", "transform=block_hadamard")
    rtn = quantized_ppl(smollm2, *common, "quant.weight_quantizer=rtn")
    gptq = quantized_ppl(smollm2, *common, "quant.weight_quantizer=gptq", gptq=True)
    *_, fp = smollm2
    assert fp < gptq < rtn, (fp, gptq, rtn)
