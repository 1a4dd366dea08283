"""Block offload: blocks visit the compute device one at a time, and offloading changes no result."""

from __future__ import annotations

import pytest
import torch

from latmix.calibrate import calibrate
from latmix.gptq import gptq_quantize_model
from latmix.models import decoder_layers
from latmix.offload import offload_blocks, offload_of, resident
from latmix.quantize import QuantLinear, prepare_model
from latmix.settings import CalibConfig, OptimConfig, QuantConfig, TransformConfig

W4A4_GPTQ = QuantConfig(weight_format="mxfp4", act_format="mxfp4", weight_quantizer="gptq")
LEARNED = TransformConfig(
    {
        "residual": {"family": "rotation", "learnable": True},
        "pre_linear": {"family": "affine", "init": "hadamard"},
        "attn_vo": {"family": "affine", "init": "hadamard"},
        "down_proj": {"family": "affine", "parametrization": "block_diag", "block_size": 32},
    }
)
LAYER_WISE = CalibConfig(
    mode="layer_wise", objective="block_mse", source="local", epochs=2, batch_size=2, grad_checkpointing=False
)


def token_ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def record_blocks_on_device(model: torch.nn.Module) -> list[list[int]]:
    """During every block forward from now on, which blocks the offload has on the device."""
    seen: list[list[int]] = []
    for block in decoder_layers(model):
        block.register_forward_hook(lambda *_: seen.append(offload_of(model).on_device()), prepend=True)
    return seen


def test_a_forward_streams_the_blocks_one_at_a_time(make_tiny_model):
    model = make_tiny_model("llama")
    expected = model(token_ids(2, 16, 0)).logits
    offload = offload_blocks(model, "cpu")
    seen = record_blocks_on_device(model)
    logits = model(token_ids(2, 16, 0)).logits
    assert seen == [[0], [1]]
    assert offload.on_device() == []
    assert torch.equal(logits, expected)


def test_a_resident_block_stays_on_the_device_through_many_forwards(make_tiny_model):
    model = make_tiny_model("llama")
    offload = offload_blocks(model, "cpu")
    seen = record_blocks_on_device(model)
    with resident(model, decoder_layers(model)[1]):
        model(token_ids(1, 8, 0))
        model(token_ids(1, 8, 1))
        assert offload.on_device() == [1]
    assert seen == [[0, 1], [1], [0, 1], [1]]
    assert offload.on_device() == []


def test_offloading_twice_is_refused(make_tiny_model):
    model = make_tiny_model("llama")
    offload_blocks(model, "cpu")
    with pytest.raises(ValueError, match="already offloaded"):
        offload_blocks(model, "cpu")


def test_offload_is_refused_for_end_to_end_calibration():
    with pytest.raises(ValueError, match="use mode=layer_wise"):
        CalibConfig(mode="end_to_end", offload=True)


def calibrate_and_gptq(build, offloaded: bool) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """(learned transforms and GPTQ weights, blocks on the device at every block forward if offloaded)."""
    fp_model = build("llama", seed=2)
    prepared = prepare_model(build("llama", seed=2), LEARNED, W4A4_GPTQ)
    seen: list[list[int]] = []
    if offloaded:
        offload_blocks(prepared.model, "cpu")
        offload_blocks(fp_model, "cpu")
        assert prepared.offload is offload_of(prepared.model)
        seen = record_blocks_on_device(prepared.model)
    calibrate(prepared, fp_model, token_ids(4, 16, 0), LAYER_WISE, OptimConfig(lr=1e-2), None)
    gptq_quantize_model(prepared, token_ids(4, 16, 1), W4A4_GPTQ)
    state = {f"{n}.{k}": v.clone() for n, t in prepared.transforms.items() for k, v in t.state_dict().items()}
    for name, linear in prepared.model.named_modules():
        if isinstance(linear, QuantLinear):
            state[name] = linear.weight.detach().clone()
    return state, seen


def test_offloaded_layer_wise_calibration_and_gptq_match_the_resident_run(make_tiny_model):
    resident_run, _ = calibrate_and_gptq(make_tiny_model, offloaded=False)
    offloaded_run, seen = calibrate_and_gptq(make_tiny_model, offloaded=True)
    assert resident_run.keys() == offloaded_run.keys()
    for name, tensor in resident_run.items():
        assert torch.equal(tensor, offloaded_run[name]), name
    assert {tuple(blocks) for blocks in seen} == {(0,), (1,)}, "more than one block was on the device"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_only_the_working_block_and_the_shared_maps_are_on_it(make_tiny_model):
    reference = make_tiny_model("llama")
    prepared = prepare_model(make_tiny_model("llama"), LEARNED, QuantConfig())
    model = prepared.model
    expected = prepare_model(reference, LEARNED, QuantConfig()).model(token_ids(2, 16, 0)).logits
    offload_blocks(model, "cuda")
    blocks = decoder_layers(model)
    assert model.lm_head.weight.is_cuda and prepared.transforms["residual"].matrix().is_cuda
    assert all(not p.is_cuda for p in blocks[0].self_attn.o_proj.parameters(recurse=False))
    logits = model(token_ids(2, 16, 0).cuda()).logits
    torch.testing.assert_close(logits.cpu(), expected, rtol=1e-4, atol=1e-4)
    with resident(model, blocks[1]):
        assert blocks[1].mlp.down_proj.weight.is_cuda and not blocks[0].mlp.down_proj.weight.is_cuda
    assert prepared.transforms["residual"].matrix().is_cuda, "the shared map left the device"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_layer_wise_calibration_gptq_and_folding_run_with_one_block_on_it(make_tiny_model):
    fp_model = make_tiny_model("llama", seed=2)
    prepared = prepare_model(make_tiny_model("llama", seed=2), LEARNED, W4A4_GPTQ)
    model = prepared.model
    offload_blocks(model, "cuda")
    offload_blocks(fp_model, "cuda")
    seen = record_blocks_on_device(model)
    calibrate(prepared, fp_model, token_ids(4, 16, 0), LAYER_WISE, OptimConfig(lr=1e-2), None)
    gptq_quantize_model(prepared, token_ids(4, 16, 1), W4A4_GPTQ)
    logits = model(token_ids(2, 16, 2).cuda()).logits
    assert torch.isfinite(logits).all()
    assert {tuple(blocks) for blocks in seen} == {(0,), (1,)}
    assert not any(p.is_cuda for block in decoder_layers(model) for p in block.parameters())
