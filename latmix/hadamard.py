"""Hadamard matrices of size 2^k * m and their fast application.

A Hadamard matrix of order n is an n x n matrix of +-1 entries with H H^T = n I. We build
H_n = H_m ⊗ H_{2^k} where the power-of-two factor is Sylvester's construction (applied in
O(n log n) by butterflies, never materialized on the fast path) and the small factor H_m comes from
Paley's constructions over a finite field GF(q), q a prime or a prime square or cube:

- Paley I: q ≡ 3 (mod 4) gives order q + 1 (12, 20, 24, 28, 44, 48, 60, 108, 140, ...);
- Paley II: q ≡ 1 (mod 4) gives order 2 (q + 1) (20, 28, 36, 52, 60, 76, 100, 108, 148, ...).

Williamson-type orders (156, 172, ...) are not built; asking for such a size is an error that points
to block_hadamard.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "fwht",
    "hadamard_factorization",
    "hadamard_matrix",
    "hadamard_transform",
    "is_hadamard_size",
    "small_hadamard_factor",
]


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % p for p in range(2, math.isqrt(q) + 1))


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime, k <= 3 (where irreducibility is just having no root); else None."""
    for k in (1, 2, 3):
        p = round(q ** (1 / k))
        if p**k == q and _is_prime(p):
            return p, k
    return None


def _irreducible_tail(p: int, k: int) -> tuple[int, ...]:
    """Coefficients c_0..c_{k-1} of a monic irreducible x^k + ... over GF(p) (degree <= 3: no roots)."""
    for code in range(p**k):
        tail = tuple((code // p**i) % p for i in range(k))
        if k == 1 or all((x**k + sum(c * x**i for i, c in enumerate(tail))) % p for x in range(p)):
            return tail
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")


def _field_square(a: tuple[int, ...], p: int, tail: tuple[int, ...]) -> tuple[int, ...]:
    """a * a in GF(p^k) = GF(p)[x] / (x^k + tail)."""
    k = len(a)
    product = [0] * (2 * k - 1)
    for i, ai in enumerate(a):
        for j, aj in enumerate(a):
            product[i + j] += ai * aj
    for degree in range(2 * k - 2, k - 1, -1):  # x^k = -tail
        lead, product[degree] = product[degree], 0
        for i, c in enumerate(tail):
            product[degree - k + i] -= lead * c
    return tuple(c % p for c in product[:k])


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(x_j - x_i) over GF(q), chi the quadratic character, elements x_i in base-p order."""
    p, k = _prime_power(q)
    tail = _irreducible_tail(p, k)
    elements = [tuple((e // p**i) % p for i in range(k)) for e in range(q)]
    squares = {_field_square(a, p, tail) for a in elements[1:]}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in elements[1:]], dtype=torch.float64)
    coefficients = torch.tensor(elements)
    differences = (coefficients[None, :, :] - coefficients[:, None, :]) % p
    return chi[(differences * p ** torch.arange(k)).sum(-1)]


def _paley_construction(m: int) -> str | None:
    """Which Paley construction yields order m, if any ("I", "II" or None)."""
    if m % 4 != 0:
        return None
    if _prime_power(m - 1) and (m - 1) % 4 == 3:
        return "I"
    if _prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "II"
    return None


def _paley_matrix(m: int) -> torch.Tensor:
    construction = _paley_construction(m)
    if construction == "I":
        q = m - 1
        ones = torch.ones(q, dtype=torch.float64)
        skew = torch.zeros(m, m, dtype=torch.float64)
        skew[0, 1:] = ones
        skew[1:, 0] = -ones
        skew[1:, 1:] = _jacobsthal(q)
        return skew + torch.eye(m, dtype=torch.float64)
    q = m // 2 - 1
    conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    conference[0, 1:] = 1.0
    conference[1:, 0] = 1.0
    conference[1:, 1:] = _jacobsthal(q)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conference, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def hadamard_factorization(n: int) -> tuple[int, int] | None:
    """(m, 2^k) with n = m * 2^k and H_m constructible, the smallest such m; None if there is none."""
    if n < 1:
        return None
    power = n & -n
    candidates = []
    while power >= 1:
        m = n // power
        if m == 1 or _paley_construction(m) is not None:
            candidates.append((m, power))
        power //= 2
    return min(candidates) if candidates else None


def is_hadamard_size(n: int) -> bool:
    return hadamard_factorization(n) is not None


def _unsupported_size_error(n: int) -> ValueError:
    return ValueError(
        f"no Hadamard construction for size {n}: supported sizes are 2^k * m with m = 1 or a Paley order "
        "(q+1 for q ≡ 3 mod 4, 2(q+1) for q ≡ 1 mod 4, q a prime, prime square or prime cube). "
        "Use family block_hadamard (block = the MX block size) or rotation for this dimension."
    )


@functools.lru_cache(maxsize=64)
def _small_hadamard(m: int) -> torch.Tensor:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    return _paley_matrix(m)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int) -> torch.Tensor:
    """The unnormalized +-1 Hadamard matrix H_m ⊗ H_{2^k} of order n, float64 on the CPU (a reference)."""
    factors = hadamard_factorization(n)
    if factors is None:
        raise _unsupported_size_error(n)
    m, power = factors
    return torch.kron(_small_hadamard(m), _sylvester(power))


# The butterfly stages of the fast transform run as dense +-1 products of at most this order: one pass
# over memory per FWHT_CHUNK-fold instead of one per stage (the same sums of +-x, added in another order).
FWHT_CHUNK = 128


@functools.lru_cache(maxsize=32)
def _sylvester_on(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _sylvester(n).to(device=device, dtype=dtype)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x @ H^T along the last dim for the Sylvester H of order x.shape[-1] (a power of two), unnormalized.

    H_n = H_a ⊗ H_b ⊗ ... (Sylvester orders of at most FWHT_CHUNK, row-major), each applied as a
    dense product along its own axis; H is symmetric, so x @ H^T = x @ H.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two last dimension, got {n}")
    lead = x.shape[:-1]
    sizes = []
    while math.prod(sizes) < n:
        sizes.append(min(FWHT_CHUNK, n // math.prod(sizes)))
    y = x.reshape(*lead, *sizes)
    for axis, size in enumerate(sizes):
        if size > 1:
            h = _sylvester_on(size, x.dtype, x.device)
            y = (y.movedim(len(lead) + axis, -1) @ h).movedim(-1, len(lead) + axis)
    return y.reshape(*lead, n)


def small_hadamard_factor(n: int) -> torch.Tensor:
    """The dense +-1 factor H_m of H_n = H_m ⊗ H_{2^k} (float64, CPU): what hadamard_transform multiplies by."""
    factors = hadamard_factorization(n)
    if factors is None:
        raise _unsupported_size_error(n)
    return _small_hadamard(factors[0])


def hadamard_transform(
    x: torch.Tensor, normalize: bool = True, transpose: bool = False, small_factor: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ H_n^T along the last dim, H_n = H_m ⊗ H_{2^k}: butterflies for 2^k, a dense m x m matmul for m.

    With normalize, H_n / sqrt(n), which is orthogonal; with transpose, x @ H_n (the inverse direction,
    since the Paley factor is not symmetric). small_factor: small_hadamard_factor(n) already on x's
    device, to avoid a host-to-device copy per call.
    """
    n = x.shape[-1]
    factors = hadamard_factorization(n)
    if factors is None:
        raise _unsupported_size_error(n)
    m, power = factors
    # Row-major index (a, b) with a < m, b < 2^k: y[a, b] = sum H_m[a, a'] H_2k[b, b'] x[a', b'].
    blocks = fwht(x.reshape(*x.shape[:-1], m, power))
    if m > 1:
        h_m = (_small_hadamard(m) if small_factor is None else small_factor).to(device=x.device, dtype=x.dtype)
        h_m = h_m.T if transpose else h_m
        blocks = torch.einsum("ij,...jb->...ib", h_m, blocks)
    y = blocks.reshape(x.shape)
    return y / math.sqrt(n) if normalize else y
