"""latmix.fidelity.next_token_kl: the calibration KL, computed a chunk of tokens at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import latmix.fidelity as fidelity
from latmix.fidelity import next_token_kl


def whole_tensor_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """The definition, on the whole (tokens x vocabulary) tensor at once."""
    log_p = F.log_softmax(logits.float().flatten(0, -2), dim=-1)
    log_ref = F.log_softmax(ref_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(log_p, log_ref, log_target=True, reduction="batchmean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [2**25, 5 * 300, 7 * 300])  # one chunk; 5-token chunks; uneven ones
@pytest.mark.parametrize("recompute_elements", [0, 2**40], ids=["recomputed", "kept"])
def test_chunked_kl_has_the_whole_tensor_gradients_bit_for_bit_and_its_value(
    dtype, chunk_elements, recompute_elements, monkeypatch
):
    monkeypatch.setattr(fidelity, "KL_CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(fidelity, "KL_RECOMPUTE_ELEMENTS", recompute_elements)
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 17, 300, generator=generator)).to(dtype).requires_grad_()
    ref_logits = (3 * torch.randn(3, 17, 300, generator=generator)).to(dtype)
    same_logits = logits.detach().clone().requires_grad_()

    expected = whole_tensor_kl(logits, ref_logits)
    expected.backward()
    chunked = next_token_kl(same_logits, ref_logits)
    chunked.backward()

    assert torch.equal(same_logits.grad, logits.grad)
    torch.testing.assert_close(chunked, expected, rtol=1e-6, atol=0)
    with torch.no_grad():
        assert torch.equal(next_token_kl(logits, ref_logits), chunked.detach())


def test_kl_refuses_logits_of_different_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        next_token_kl(torch.zeros(2, 3, 5), torch.zeros(2, 4, 5))
