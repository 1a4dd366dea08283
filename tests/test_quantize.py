"""QuantLinear conventions, MX quantization points, configs and their errors."""

import pytest
import torch
from conftest import build_tiny_checkpoint
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from latmix import mx
from latmix.models import load_model
from latmix.quantize import QuantLinear, prepare_model
from latmix.settings import QuantConfig, TransformConfig
from latmix.transforms import build_transform


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def linear():
    layer = nn.Linear(64, 48)
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def _affine_with_shift(dim: int = 64):
    transform = build_transform("affine", dim, parametrization="qr", init="random", shift=True)
    with torch.no_grad():
        for param in transform.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return transform


def test_folded_in_undoes_a_transform_applied_upstream(linear):
    transform, x = _affine_with_shift(), torch.randn(5, 64)
    wrapped = QuantLinear(linear, folded_in=[transform])
    torch.testing.assert_close(wrapped(transform(x)), linear(x), atol=1e-5, rtol=1e-5)


def test_online_in_applies_the_transform_and_folds_its_inverse(linear):
    transform, x = _affine_with_shift(), torch.randn(5, 64)
    wrapped = QuantLinear(linear, online_in=[transform])
    torch.testing.assert_close(wrapped(x), linear(x), atol=1e-5, rtol=1e-5)


def test_out_map_transforms_the_output(linear):
    transform, x = _affine_with_shift(48), torch.randn(5, 64)
    wrapped = QuantLinear(linear, out_map=[transform])
    torch.testing.assert_close(wrapped(x), transform(linear(x)), atol=1e-5, rtol=1e-5)


def test_freeze_folds_once_and_keeps_only_the_online_transform(linear):
    upstream, online, x = _affine_with_shift(), _affine_with_shift(), torch.randn(5, 64)
    wrapped = QuantLinear(linear, folded_in=[upstream], online_in=[online])
    before = wrapped(upstream(x)).detach()
    wrapped.freeze()
    assert len(wrapped.folded_in) == 0 and len(wrapped.online_in) == 1
    assert not any(p.requires_grad for p in online.parameters())
    torch.testing.assert_close(wrapped(upstream(x)), before, atol=1e-5, rtol=1e-5)


def test_weights_are_quantized_along_the_input_dim_and_acts_along_the_last_dim(linear):
    x = torch.randn(3, 5, 64)
    wrapped = QuantLinear(linear, weight_format="mxfp4", act_format="mxfp4", weight_block_size=32, act_block_size=32)
    expected = nn.functional.linear(
        mx.quantize(x, "mxfp4", 32, dim=-1), mx.quantize(linear.weight, "mxfp4", 32, dim=-1), linear.bias
    )
    torch.testing.assert_close(wrapped(x), expected)
    wrapped.quantize_weights, wrapped.quantize_acts = False, False
    torch.testing.assert_close(wrapped(x), linear(x))


def test_gradients_reach_transforms_through_the_quantizers(linear):
    transform = _affine_with_shift()
    wrapped = QuantLinear(linear, online_in=[transform], weight_format="mxfp4", act_format="mxfp4",
                          weight_block_size=32, act_block_size=32)
    wrapped(torch.randn(8, 64)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in transform.parameters())


def test_learnable_clip_ratios_reach_the_quantizer_and_train(linear):
    wrapped = QuantLinear(linear, weight_format="mxfp4", act_format="mxfp4", weight_block_size=32, act_block_size=32)
    x = torch.randn(4, 64)
    unclipped = wrapped(x).detach()
    wrapped.weight_clip = nn.Parameter(torch.full((48, 2, 1), 0.7))
    wrapped.act_clip = nn.Parameter(torch.full((4, 2, 1), 0.7))
    clipped = wrapped(x)
    assert not torch.allclose(clipped, unclipped)
    clipped.pow(2).sum().backward()
    assert wrapped.weight_clip.grad.abs().sum() > 0 and wrapped.act_clip.grad.abs().sum() > 0


def test_frozen_quantized_weight_is_cached_until_the_weight_changes(linear):
    wrapped = QuantLinear(linear, weight_format="mxfp4", weight_block_size=32)
    wrapped.freeze()
    x = torch.randn(2, 64)
    with torch.no_grad():
        first = wrapped(x)
        wrapped.weight.mul_(2.0)
        second = wrapped(x)
    torch.testing.assert_close(second - linear.bias, 2 * (first - linear.bias))


def test_set_weight_installs_a_gptq_weight_that_is_not_requantized(linear):
    wrapped = QuantLinear(linear, folded_in=[_affine_with_shift()], weight_format="mxfp4", weight_block_size=32)
    written = torch.randn(48, 64) * 0.01
    wrapped.set_weight(written)
    assert wrapped.frozen and wrapped.weight_is_quantized
    x = torch.randn(3, 64)
    torch.testing.assert_close(wrapped(x), x @ written.T + wrapped.bias, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        wrapped.set_weight(torch.zeros(3, 3))


def test_only_the_configured_layer_roles_are_quantized(make_tiny_model):
    prepared = prepare_model(make_tiny_model("llama"), TransformConfig(), QuantConfig("mxfp4", "mxfp4", layers=["down"]))
    adapter = prepared.adapter
    layer = adapter.layers()[0]
    assert adapter.linear(layer, "down").quantize_weights and adapter.linear(layer, "down").quantize_acts
    assert not adapter.linear(layer, "q").quantize_weights and not adapter.linear(layer, "q").quantize_acts
    assert isinstance(adapter.lm_head, nn.Linear)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_format": "mxfp3"}, "unknown MX format"),
        ({"act_format": "int4"}, "unknown MX format"),
        ({"weight_quantizer": "awq"}, "unknown weight_quantizer"),
        ({"block_size": 0}, "block_size"),
        ({"layers": "all"}, "layers must be"),
        ({"layers": ["q", "attn"]}, "unknown layer roles"),
    ],
)
def test_quant_config_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


@pytest.mark.parametrize(
    ("placements", "approximate", "message"),
    [
        ({"r1": {"family": "hadamard"}}, False, "unknown placement"),
        ({"residual": {"family": "givens"}}, False, "unknown family"),
        ({"residual": {"family": "hadamard", "block_size": 32}}, False, "does not take"),
        ({"residual": {"family": "affine"}}, False, "approximate: true"),
        ({"residual": {"family": "affine", "shift": True}}, True, "no shift"),
        ({"qk": {"family": "affine"}}, False, "orthogonal family"),
        ({"attn_vo": {"family": "affine", "init": "hadamrd"}}, False, "init='hadamrd' is not supported"),
        ({"down_proj": {"family": "affine", "parametrization": "block_diag", "factor": "qq"}}, False, "factor='qq'"),
    ],
)
def test_transform_config_rejects_bad_input(placements, approximate, message):
    with pytest.raises(ValueError, match=message):
        TransformConfig(placements, approximate=approximate)


def test_transform_config_accepts_every_placement_off():
    cfg = TransformConfig({p: None for p in ("residual", "pre_linear", "attn_vo", "down_proj", "qk")})
    assert cfg.active() == {}


def test_a_block_size_that_does_not_divide_a_layer_is_a_clear_error(make_tiny_model):
    with pytest.raises(ValueError, match=r"does not divide the model's intermediate_size=96, the input dim of layer role 'down'"):
        prepare_model(make_tiny_model("llama"), TransformConfig(), QuantConfig("mxfp4", None, block_size=64))


def test_a_hadamard_placement_with_no_construction_suggests_block_hadamard():
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=156, num_hidden_layers=1,
                         num_attention_heads=2, head_dim=32)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"dim=156.*block_hadamard"):
        prepare_model(model, TransformConfig({"down_proj": {"family": "hadamard"}}), QuantConfig())


def test_an_architecture_with_no_adapter_is_a_clear_error():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="no adapter for model_type 'gpt2'"):
        prepare_model(gpt2, TransformConfig(), QuantConfig())


def test_preparing_a_model_twice_is_refused(make_tiny_model):
    prepared = prepare_model(make_tiny_model("llama"), TransformConfig(), QuantConfig())
    with pytest.raises(ValueError, match="already prepared"):
        prepare_model(prepared.model, TransformConfig(), QuantConfig())


def test_load_model_without_hub_access_says_to_pass_a_local_path(tmp_path):
    with pytest.raises(OSError, match="local directory"):
        load_model(str(tmp_path / "missing-model"), "float32", "cpu")


def test_load_model_reads_a_local_directory(tmp_path, make_tiny_model, input_ids):
    original = make_tiny_model("qwen2")
    build_tiny_checkpoint(tmp_path, model=original)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    model, loaded_tokenizer = load_model(str(tmp_path), "float32", original.device)
    assert not model.training and loaded_tokenizer.vocab_size == tokenizer.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, original(input_ids).logits)


@pytest.mark.parametrize("placements", [{}, {"pre_linear": {"family": "hadamard"}, "down_proj": {"family": "hadamard"}}])
def test_linears_that_read_one_input_quantize_it_once_per_forward(make_tiny_model, input_ids, placements, monkeypatch):
    # q/k/v and gate/up read the same tensor through the same maps: one quantized operand serves each
    # group (4 activation quantizations per block instead of 7), with the same logits as computing it thrice.
    import latmix.quantize as quantize

    quant = QuantConfig(weight_format="mxfp4", act_format="mxfp4")
    model = prepare_model(make_tiny_model("llama"), TransformConfig(placements), quant).model
    calls = []
    real = mx.quantize
    monkeypatch.setattr(quantize.mx, "quantize", lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
    with torch.no_grad():
        model(input_ids)  # the weights are quantized (and cached) on this first forward
        calls.clear()
        shared = model(input_ids).logits
    assert len(calls) == 2 * 4
    monkeypatch.setattr(QuantLinear, "operand_key", lambda self: (id(self),))
    with torch.no_grad():
        separate = model(input_ids).logits
    assert torch.equal(shared, separate)
