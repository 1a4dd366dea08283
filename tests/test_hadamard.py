"""Hadamard constructions: orthogonal for every supported size, fast path equal to the dense matrix."""

import pytest
import torch

from latmix.hadamard import (
    fwht,
    hadamard_factorization,
    hadamard_matrix,
    hadamard_transform,
    is_hadamard_size,
)

SUPPORTED_UP_TO_256 = [n for n in range(1, 257) if is_hadamard_size(n)]


def test_the_small_orders_the_papers_need_are_supported():
    for n in (1, 2, 4, 12, 20, 28, 36, 40, 52, 60, 108, 140, 148):
        assert is_hadamard_size(n), n


@pytest.mark.parametrize(("n", "q"), [(52, 25), (100, 49), (344, 343)])
def test_prime_power_paley_orders_are_hadamard(n, q):
    # 52 = 2 (25 + 1) and 100 = 2 (49 + 1) by Paley II over GF(p^2), 344 = 343 + 1 by Paley I over GF(7^3)
    assert hadamard_factorization(n) == (n, 1)
    h = hadamard_matrix(n)
    torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("n", SUPPORTED_UP_TO_256)
def test_every_supported_size_is_a_hadamard_matrix(n):
    h = hadamard_matrix(n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("n", [n for n in SUPPORTED_UP_TO_256 if n >= 8])
def test_fast_transform_equals_dense_matrix(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    h = hadamard_matrix(n)
    torch.testing.assert_close(hadamard_transform(x, normalize=False), x @ h.T)
    torch.testing.assert_close(hadamard_transform(x, normalize=False, transpose=True), x @ h)
    torch.testing.assert_close(hadamard_transform(x), x @ h.T / n**0.5)


@pytest.mark.parametrize(
    ("n", "factors"),
    [(4096, (1, 4096)), (14336, (28, 512)), (3584, (28, 128)), (18944, (148, 128)), (11008, (344, 32)), (6, None),
     # the rest of conf/model/: SmolLM2 576 / 1536, Llama-3.2-1B 2048 / 8192, Llama-3.2-3B 3072, heads 64 / 128
     (576, (36, 16)), (1536, (12, 128)), (2048, (1, 2048)), (8192, (1, 8192)), (3072, (12, 256)), (64, (1, 64)),
     (128, (1, 128)),
     # larger published models: Llama-2-13B's intermediate 13824, Qwen2-72B's 29568
     (13824, (108, 128)), (29568, (924, 32))],
)
def test_model_sizes_factor_into_a_known_small_hadamard(n, factors):
    assert hadamard_factorization(n) == factors


@pytest.mark.parametrize("n", [14336, 18944])
def test_fast_transform_is_orthogonal_at_llama3_and_qwen25_sizes(n):
    x = torch.randn(2, n, dtype=torch.float64)
    y = hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(hadamard_transform(y, transpose=True), x)


@pytest.mark.parametrize("n", [6, 156, 172])
def test_a_size_with_no_construction_is_a_clear_error(n):
    with pytest.raises(ValueError, match="block_hadamard"):
        hadamard_matrix(n)
    with pytest.raises(ValueError, match="block_hadamard"):
        hadamard_transform(torch.randn(n))


def test_fwht_rejects_a_length_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.randn(12))
