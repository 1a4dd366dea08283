"""Transform families: invertible maps T(x) = x @ A.T + b applied to activations before quantization.

Every family is an nn.Module with one interface (docs/architecture.md): forward/inverse on activations
along the last dim, the explicit matrix A and its inverse, fold_into(W) = W @ inv(A) for the linear that
consumes T(x), log|det A|, the volume regularizer and the condition number. Math runs in float32 (the
dtype of the transform's own tensors); inputs are cast back to their dtype on the way out.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from latmix.hadamard import (
    hadamard_factorization,
    hadamard_transform,
    is_hadamard_size,
    small_hadamard_factor,
)
from latmix.settings import (
    AFFINE_PARAMETRIZATIONS,
    FACTOR_PARAMETRIZATIONS,
    INITS,
    LEARNED_PARTS,
    PREMIXES,
    ROTATION_PARAMETRIZATIONS,
)

__all__ = [
    "TRANSFORMS",
    "AcrossHeads",
    "Affine",
    "BlockHadamard",
    "Hadamard",
    "Headwise",
    "Identity",
    "Rotation",
    "Transform",
    "build_transform",
    "cached_transforms",
    "random_orthogonal",
    "skew_exp",
    "transform_kwargs",
]

_matrix_cache: dict[tuple[int, str], list[torch.Tensor]] | None = None
# The premix Hadamard's seed, apart from the seeds of the learned map's own starts (seed + i).
PREMIX_SEED_OFFSET = 7919
# An affine map with channel scales this wide or narrower gives its exact condition number (a dense
# SVD); a wider one (an 8B model's 14336) the upper bound cond(B) cond(D), which the guard can afford.
DENSE_CONDITION_LIMIT = 4096


@contextlib.contextmanager
def cached_transforms() -> Iterator[None]:
    """Inside the block each learnable transform builds its matrices once, however many linears fold it.

    Meant for one forward pass (the shared residual map is folded into every reader and writer);
    gradients still flow through the cached tensors. Leave the block before parameters change.
    """
    global _matrix_cache
    outer = _matrix_cache
    _matrix_cache = {} if outer is None else outer
    try:
        with parametrize.cached():
            yield
    finally:
        _matrix_cache = outer


def _cached(owner: nn.Module, kind: str, build: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
    if _matrix_cache is None:
        return build()
    key = (id(owner), kind)
    if key not in _matrix_cache:
        _matrix_cache[key] = build()
    return _matrix_cache[key]


class Transform(nn.Module):
    """Base class: subclasses provide matrix(); structured ones override the apply/fold paths for speed."""

    def __init__(self, dim: int, orthogonal: bool) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"a transform needs a positive dimension, got dim={dim}")
        self.dim = dim
        self.orthogonal = orthogonal
        # Gives parameter-free families a device and dtype that follow module.to(...).
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    @property
    def shift(self) -> torch.Tensor | None:
        return None

    def matrix(self) -> torch.Tensor:
        raise NotImplementedError

    def inverse_matrix(self) -> torch.Tensor:
        if self.orthogonal:
            return self.matrix().T
        return torch.linalg.inv(self.matrix().double()).to(self._anchor.dtype)

    def apply_cost(self) -> int:
        """Multiply-adds per row of apply_matrix (a dense product unless the family has structure)."""
        return self.dim * self.dim

    def apply_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """x @ A.T along the last dim (no shift)."""
        return x @ self.matrix().T

    def apply_inverse_matrix(self, y: torch.Tensor) -> torch.Tensor:
        """y @ inv(A).T along the last dim."""
        return y @ self.inverse_matrix().T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.apply_matrix(self._to_compute(x))
        if self.shift is not None:
            y = y + self.shift
        return y.to(x.dtype)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        z = self._to_compute(y)
        if self.shift is not None:
            z = z - self.shift
        return self.apply_inverse_matrix(z).to(y.dtype)

    def fold_into(self, weight: torch.Tensor) -> torch.Tensor:
        """weight @ inv(A): the weight that, fed T(x), computes what `weight` computed on x (less the shift)."""
        w = self._to_compute(weight)
        folded = self.apply_matrix(w) if self.orthogonal else w @ self.inverse_matrix()
        return folded.to(weight.dtype)

    def log_abs_det(self) -> torch.Tensor:
        return self._anchor.new_zeros(())

    def regularizer(self) -> torch.Tensor:
        return self.log_abs_det() ** 2

    def condition_number(self) -> float:
        if self.orthogonal:
            return 1.0
        return _condition_of(self.matrix().detach()[None])

    def smallest_singular_value(self) -> torch.Tensor:
        """sigma_min(A) in float32, differentiable, from the map's structure where it has one."""
        if self.orthogonal:
            return self._anchor.new_ones(())
        return torch.linalg.svdvals(self.matrix().float()).min()

    @torch.no_grad()
    def singular_values(self) -> torch.Tensor:
        """Every singular value of A (float64), from the map's structure where it has one."""
        if self.orthogonal:
            return torch.ones(self.dim, dtype=torch.float64, device=self._anchor.device)
        return torch.linalg.svdvals(self.matrix().detach().double())

    def _to_compute(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self._anchor.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _condition_of(blocks: torch.Tensor) -> float:
    """Condition number of blockdiag(blocks): the extreme singular values over all blocks."""
    sigma = torch.linalg.svdvals(blocks.double())
    return float(sigma.max() / sigma.min())


def random_orthogonal(dim: int, seed: int) -> torch.Tensor:
    """Haar-random orthogonal matrix (QR of a seeded Gaussian, signs fixed by R's diagonal), float32."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def _random_signs(dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (dim,), generator=generator).float() * 2 - 1


class Identity(Transform):
    def __init__(self, dim: int) -> None:
        super().__init__(dim, orthogonal=True)

    def matrix(self) -> torch.Tensor:
        return torch.eye(self.dim, device=self._anchor.device, dtype=self._anchor.dtype)

    def apply_cost(self) -> int:
        return 0

    def apply_matrix(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def apply_inverse_matrix(self, y: torch.Tensor) -> torch.Tensor:
        return y


class Hadamard(Transform):
    """A = H diag(s) / sqrt(d), s random signs (QuaRot); applied by the fast Walsh-Hadamard transform."""

    def __init__(self, dim: int, seed: int = 0) -> None:
        super().__init__(dim, orthogonal=True)
        if not is_hadamard_size(dim):
            m_power = dim & -dim
            raise ValueError(
                f"no Hadamard construction for dim={dim} (= {dim // m_power} * {m_power}); use family "
                "block_hadamard (block_size = the MX block size) or rotation for this placement"
            )
        self.factorization = hadamard_factorization(dim)
        self.register_buffer("signs", _random_signs(dim, seed))
        self.register_buffer("small_factor", small_hadamard_factor(dim).float(), persistent=False)

    def apply_cost(self) -> int:
        m, power = self.factorization
        return self.dim * (m + max(power.bit_length() - 1, 0))

    def apply_matrix(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x * self.signs, small_factor=self.small_factor)

    def apply_inverse_matrix(self, y: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(y, transpose=True, small_factor=self.small_factor) * self.signs

    def matrix(self) -> torch.Tensor:
        eye = torch.eye(self.dim, device=self.signs.device, dtype=self.signs.dtype)
        return self.apply_matrix(eye).T

    def extra_repr(self) -> str:
        m, power = self.factorization
        return f"dim={self.dim} (= {m} * {power})"


class BlockHadamard(Transform):
    """A = blockdiag(H_k / sqrt(k), ...): one normalized Hadamard per MX block (MR-GPTQ)."""

    def __init__(self, dim: int, block_size: int = 32) -> None:
        super().__init__(dim, orthogonal=True)
        if block_size < 1 or dim % block_size:
            raise ValueError(
                f"block_hadamard block_size={block_size} must divide the transformed dimension {dim}"
            )
        if not is_hadamard_size(block_size):
            raise ValueError(f"no Hadamard matrix of order block_size={block_size}; use a power of two")
        self.block_size = block_size
        eye = torch.eye(block_size)
        self.register_buffer("block", hadamard_transform(eye).T.contiguous())

    def apply_cost(self) -> int:
        return self.dim * self.block_size

    def apply_matrix(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.reshape(*x.shape[:-1], self.dim // self.block_size, self.block_size)
        return (blocks @ self.block.T).reshape(x.shape)

    def apply_inverse_matrix(self, y: torch.Tensor) -> torch.Tensor:
        blocks = y.reshape(*y.shape[:-1], self.dim // self.block_size, self.block_size)
        return (blocks @ self.block).reshape(y.shape)

    def matrix(self) -> torch.Tensor:
        n_blocks = self.dim // self.block_size
        return torch.kron(torch.eye(n_blocks, device=self.block.device, dtype=self.block.dtype), self.block)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, block_size={self.block_size}"


def _initial_orthogonal(init: str, dim: int, seed: int, block_size: int) -> torch.Tensor:
    """The orthogonal matrix a learnable family starts from."""
    if init == "identity":
        return torch.eye(dim)
    if init == "hadamard":
        return Hadamard(dim, seed=seed).matrix()
    if init == "block_hadamard":
        return BlockHadamard(dim, block_size=block_size).matrix()
    if init == "random":
        return random_orthogonal(dim, seed)
    raise ValueError(f"unknown init {init!r}; choose one of {INITS}")


class _OrthogonalWeight(nn.Module):
    """Holder for torch's orthogonal parametrization (a learnable point on the orthogonal group)."""

    def __init__(self, start: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty_like(start))
        parametrizations.orthogonal(self, "weight")
        with torch.no_grad():
            self.weight = start


class _StiefelWeight(nn.Module):
    """A learnable orthogonal matrix held as itself: only Cayley SGD (optim=cayley_sgd) keeps it orthogonal."""

    def __init__(self, start: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(start.clone())


class Rotation(Transform):
    """Orthogonal Q: fixed (random, Hadamard, ...) or learned on the orthogonal group.

    A learned Q is parametrized one of two ways:
      exp      Q = Q0 exp(skew X) (torch's orthogonal parametrization): orthogonal after a step of any
               optimizer; Cayley SGD would move the raw X, not Q.
      stiefel  Q itself is the parameter, as SpinQuant learns it: Cayley SGD moves Q along the orthogonal
               group (any other optimizer would leave it, which the settings refuse).
    """

    def __init__(
        self, dim: int, learnable: bool = False, init: str = "random", seed: int = 0, block_size: int = 32,
        parametrization: str = "exp",
    ) -> None:
        super().__init__(dim, orthogonal=True)
        if parametrization not in ROTATION_PARAMETRIZATIONS:
            raise ValueError(f"unknown rotation parametrization {parametrization!r}; choose {ROTATION_PARAMETRIZATIONS}")
        start = _initial_orthogonal(init, dim, seed, block_size)
        self.learnable = learnable
        if learnable:
            self.rotation = _StiefelWeight(start) if parametrization == "stiefel" else _OrthogonalWeight(start)
        else:
            self.register_buffer("fixed", start)

    def matrix(self) -> torch.Tensor:
        return self.rotation.weight if self.learnable else self.fixed


def _skew(g: torch.Tensor) -> torch.Tensor:
    return (g - g.transpose(-1, -2)) / 2


class _SkewExp(torch.autograd.Function):
    """exp(S) of a real skew-symmetric S, differentiated through S's eigendecomposition.

    matrix_exp's own backward exponentiates a 2s x 2s block matrix: 8.9 s at s = 1536 on one idle thread.
    S is normal with eigenvalues i*theta, so the Frechet derivative is diagonal in its eigenbasis, with
    the divided differences of exp as weights: one complex eigh and four complex matmuls, 2.3 s there
    (scripts/bench_skew_exp.py). The forward stays matrix_exp: values do not change.
    """

    @staticmethod
    def forward(ctx, skew: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(skew)
        return torch.linalg.matrix_exp(skew)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (skew,) = ctx.saved_tensors
        # -iS is Hermitian: S = V diag(i theta) V^H.
        theta, vectors = torch.linalg.eigh(-1j * skew)
        row, col = theta.unsqueeze(-1), theta.unsqueeze(-2)
        # (e^{i a} - e^{i b}) / (i (a - b)) written without the division, exact on (near) ties.
        divided = torch.exp(0.5j * (row + col)) * torch.sinc((row - col) / (2 * torch.pi))
        inner = vectors.mH @ grad.to(vectors.dtype) @ vectors
        return (vectors @ (inner * divided.conj()) @ vectors.mH).real.to(skew.dtype)


def skew_exp(g: torch.Tensor) -> torch.Tensor:
    """exp((G - G^T) / 2): an orthogonal matrix (batched), at identity for G = 0."""
    return _SkewExp.apply(_skew(g))


class _InvertibleBlocks(nn.Module):
    """A stack of n invertible s x s matrices, invertible by construction, starting at given orthogonals.

    qr:  A = Q0 exp(skew G) (R + diag(sign * exp(log_s)))     R strictly upper triangular
    lu:  A = P L (U + diag(sign * exp(log_u)))                 P, sign fixed by the LU of the start
    svd: A = U0 exp(skew G_u) diag(exp(log_sigma)) exp(skew G_v)^T
    The fixed factors (Q0, P, U0, sign) make the start exact; the learned ones start at identity.
    """

    def __init__(self, parametrization: str, start: torch.Tensor) -> None:
        super().__init__()
        if parametrization not in FACTOR_PARAMETRIZATIONS:
            raise ValueError(f"unknown factor parametrization {parametrization!r}; choose {FACTOR_PARAMETRIZATIONS}")
        self.parametrization = parametrization
        n, s, _ = start.shape
        zeros_square = torch.zeros(n, s, s)
        self.log_scale = nn.Parameter(torch.zeros(n, s))
        self.register_buffer("eye", torch.eye(s).expand(n, s, s).clone(), persistent=False)
        if parametrization == "qr":
            self.register_buffer("base", start.clone())
            self.register_buffer("sign", torch.ones(n, s))
            self.generator = nn.Parameter(zeros_square.clone())
            self.upper = nn.Parameter(zeros_square.clone())
        elif parametrization == "lu":
            perm, lower, upper = torch.linalg.lu(start.double())
            diag = torch.diagonal(upper, dim1=-2, dim2=-1)
            self.register_buffer("base", perm.float())
            self.register_buffer("sign", torch.sign(diag).float())
            self.lower = nn.Parameter(torch.tril(lower, -1).float())
            self.upper = nn.Parameter(torch.triu(upper, 1).float())
            with torch.no_grad():
                self.log_scale.copy_(diag.abs().log().float())
        else:
            self.register_buffer("base", start.clone())
            self.generator = nn.Parameter(zeros_square.clone())
            self.generator_right = nn.Parameter(zeros_square.clone())

    def _triangular(self) -> torch.Tensor:
        diag = torch.diag_embed(self.sign * torch.exp(self.log_scale))
        return torch.triu(self.upper, 1) + diag

    def matrices(self) -> torch.Tensor:
        if self.parametrization == "qr":
            return self.base @ skew_exp(self.generator) @ self._triangular()
        if self.parametrization == "lu":
            return self.base @ (torch.tril(self.lower, -1) + self.eye) @ self._triangular()
        left = self.base @ skew_exp(self.generator)
        right = skew_exp(self.generator_right)
        return left @ torch.diag_embed(torch.exp(self.log_scale)) @ right.transpose(-1, -2)

    def inverse_matrices(self) -> torch.Tensor:
        if self.parametrization == "qr":
            q = self.base @ skew_exp(self.generator)
            u_inv = torch.linalg.solve_triangular(self._triangular(), self.eye, upper=True)
            return u_inv @ q.transpose(-1, -2)
        if self.parametrization == "lu":
            unit_lower = torch.tril(self.lower, -1) + self.eye
            l_inv = torch.linalg.solve_triangular(unit_lower, self.eye, upper=False, unitriangular=True)
            u_inv = torch.linalg.solve_triangular(self._triangular(), self.eye, upper=True)
            return u_inv @ l_inv @ self.base.transpose(-1, -2)
        left = self.base @ skew_exp(self.generator)
        right = skew_exp(self.generator_right)
        return right @ torch.diag_embed(torch.exp(-self.log_scale)) @ left.transpose(-1, -2)

    def log_abs_det(self) -> torch.Tensor:
        """Sum over blocks of log|det|: the fixed factors are orthogonal or permutations (|det| = 1)."""
        return self.log_scale.sum()


def _balanced_factors(dim: int, hadamard_sizes: bool) -> tuple[int, int]:
    """(d1, d2) with d1 * d2 = dim and d1 the largest divisor not above sqrt(dim).

    With hadamard_sizes, only splits whose two factors both have a Hadamard matrix count.
    """
    splits = [
        (d, dim // d)
        for d in range(1, math.isqrt(dim) + 1)
        if dim % d == 0 and (not hadamard_sizes or (is_hadamard_size(d) and is_hadamard_size(dim // d)))
    ]
    if not splits:
        raise ValueError(f"kronecker affine: dim={dim} has no split into two Hadamard sizes; use init identity or random")
    return splits[-1]


def _check_affine_choices(parametrization: str, init: str, premix: str | None, learn: str) -> None:
    if learn not in LEARNED_PARTS:
        raise ValueError(f"unknown affine learn {learn!r}; choose one of {LEARNED_PARTS}")
    if premix is not None and premix not in PREMIXES:
        raise ValueError(f"unknown affine premix {premix!r}; choose null or one of {PREMIXES}")
    if parametrization not in AFFINE_PARAMETRIZATIONS:
        raise ValueError(f"unknown affine parametrization {parametrization!r}; choose {AFFINE_PARAMETRIZATIONS}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")


class Affine(Transform):
    """Learnable invertible A (plus optional shift b), invertible by construction (LATMiX, FlatQuant).

    parametrization: qr | lu | svd (one full dim x dim matrix), block_diag (independent
    block_size x block_size blocks, each a `factor` parametrization) or kronecker (A1 ⊗ A2 with sizes
    kron_factors, default the most balanced split, each factor a `factor` parametrization).
    init: identity | hadamard | block_hadamard | random (orthogonal starts; the transform is exactly
    that matrix before training).
    learn: all | scales (only the per-channel scales exp(log_scale) of each block or factor, the part
    calib.smooth_alpha sets; the mixing stays at its start). Ignored when not learnable.
    channel_scales: a learnable per-input-channel scale D applied first, A = B H D (FlatQuant's
    add_diag): the one diagonal a Kronecker or premixed map can take calib.smooth_alpha's start in.
    """

    def __init__(
        self,
        dim: int,
        parametrization: str = "qr",
        init: str = "identity",
        shift: bool = False,
        learnable: bool = True,
        seed: int = 0,
        block_size: int = 32,
        factor: str = "qr",
        kron_factors: tuple[int, int] | None = None,
        premix: str | None = None,
        learn: str = "all",
        channel_scales: bool = False,
    ) -> None:
        super().__init__(dim, orthogonal=False)
        _check_affine_choices(parametrization, init, premix, learn)
        self.parametrization = parametrization
        self.kronecker = parametrization == "kronecker"
        if self.kronecker:
            self.factor_sizes = self._kron_sizes(dim, kron_factors, hadamard_sizes=init == "hadamard")
        self.factors = self._initial_factors(dim, init, seed, block_size, factor)
        self.bias = nn.Parameter(torch.zeros(dim)) if shift else None
        # premix: a fixed randomized full Hadamard H before the learned (structured) map B, A = B H: H
        # spreads outliers across all blocks, B reshapes each block (cheap: one FWHT plus the blocks).
        self.premix = Hadamard(dim, seed=seed + PREMIX_SEED_OFFSET) if premix == "hadamard" else None
        # Named like the factors' log_scale, so learn=scales learns it too.
        self.channel_log_scale = nn.Parameter(torch.zeros(dim)) if channel_scales else None
        self.requires_grad_(learnable)
        if learnable and learn == "scales":
            for name, param in self.named_parameters():
                param.requires_grad_(name.endswith("log_scale"))

    def _initial_factors(self, dim: int, init: str, seed: int, block_size: int, factor: str) -> nn.ModuleList:
        """The parametrized factors at their orthogonal start: the two Kronecker factors, the blocks of a
        block-diagonal map (one block-Hadamard start is a Hadamard per block), or one dense matrix."""
        if self.kronecker:
            if init == "block_hadamard":
                raise ValueError("kronecker affine: use init hadamard (each factor a Hadamard), not block_hadamard")
            return nn.ModuleList(
                _InvertibleBlocks(factor, _initial_orthogonal(init, size, seed + i, block_size)[None])
                for i, size in enumerate(self.factor_sizes)
            )
        if self.parametrization == "block_diag":
            if block_size < 1 or dim % block_size:
                raise ValueError(f"block_diag affine: block_size={block_size} must divide dim={dim}")
            block_init = "hadamard" if init == "block_hadamard" else init
            starts = torch.stack(
                [_initial_orthogonal(block_init, block_size, seed + i, block_size) for i in range(dim // block_size)]
            )
            return nn.ModuleList([_InvertibleBlocks(factor, starts)])
        start = _initial_orthogonal(init, dim, seed, block_size)[None]
        return nn.ModuleList([_InvertibleBlocks(self.parametrization, start)])

    @staticmethod
    def _kron_sizes(dim: int, kron_factors: tuple[int, int] | None, hadamard_sizes: bool) -> tuple[int, int]:
        if kron_factors is None:
            return _balanced_factors(dim, hadamard_sizes)
        d1, d2 = kron_factors
        if d1 * d2 != dim:
            raise ValueError(f"kron_factors {kron_factors} must multiply to dim={dim}")
        return d1, d2

    @property
    def shift(self) -> torch.Tensor | None:
        return self.bias

    def _structured_apply(self, x: torch.Tensor, mats: list[torch.Tensor], transpose: bool) -> torch.Tensor:
        """x @ M.T (or x @ M with transpose) along the last dim, M = A or inv(A) given by its factors."""
        if self.kronecker:
            m1, m2 = mats[0][0], mats[1][0]
            if transpose:
                m1, m2 = m1.T, m2.T
            grid = x.reshape(*x.shape[:-1], *self.factor_sizes)
            return torch.einsum("ij,...jk,lk->...il", m1, grid, m2).reshape(x.shape)
        blocks = mats[0]
        n_blocks, size = blocks.shape[0], blocks.shape[-1]
        grid = x.reshape(*x.shape[:-1], n_blocks, size)
        pattern = "...nj,nji->...ni" if transpose else "...nj,nij->...ni"
        return torch.einsum(pattern, grid, blocks).reshape(x.shape)

    def _matrices(self) -> list[torch.Tensor]:
        return _cached(self, "matrices", lambda: [f.matrices() for f in self.factors])

    def _inverse_matrices(self) -> list[torch.Tensor]:
        return _cached(self, "inverse", lambda: [f.inverse_matrices() for f in self.factors])

    def _assemble(self, mats: list[torch.Tensor]) -> torch.Tensor:
        if self.kronecker:
            return torch.kron(mats[0][0], mats[1][0])
        return torch.block_diag(*mats[0])

    def _channel_scale(self) -> torch.Tensor | None:
        return None if self.channel_log_scale is None else torch.exp(self.channel_log_scale)

    def matrix(self) -> torch.Tensor:
        A = self._assemble(self._matrices())
        if self.premix is not None:
            A = A @ self.premix.matrix()
        scale = self._channel_scale()
        return A if scale is None else A * scale

    def inverse_matrix(self) -> torch.Tensor:
        A_inv = self._assemble(self._inverse_matrices())
        if self.premix is not None:
            A_inv = self.premix.matrix().T @ A_inv
        scale = self._channel_scale()
        return A_inv if scale is None else A_inv / scale[:, None]

    def apply_cost(self) -> int:
        mix = 0 if self.premix is None else self.premix.apply_cost()
        if self.kronecker:
            return mix + self.dim * sum(self.factor_sizes)
        return mix + self.dim * self.factors[0].log_scale.shape[-1]

    def apply_matrix(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._channel_scale()
        if scale is not None:
            x = x * scale
        if self.premix is not None:
            x = self.premix.apply_matrix(x)
        return self._structured_apply(x, self._matrices(), transpose=False)

    def apply_inverse_matrix(self, y: torch.Tensor) -> torch.Tensor:
        x = self._structured_apply(y, self._inverse_matrices(), transpose=False)
        if self.premix is not None:
            x = self.premix.apply_inverse_matrix(x)
        scale = self._channel_scale()
        return x if scale is None else x / scale

    def fold_into(self, weight: torch.Tensor) -> torch.Tensor:
        # W A^-1 = ((W D^-1) H^T) B^-1, and W H^T applies H to each row of W.
        w = self._to_compute(weight)
        scale = self._channel_scale()
        if scale is not None:
            w = w / scale
        if self.premix is not None:
            w = self.premix.apply_matrix(w)
        return self._structured_apply(w, self._inverse_matrices(), transpose=True).to(weight.dtype)

    def log_abs_det(self) -> torch.Tensor:
        if self.kronecker:
            d1, d2 = self.factor_sizes
            # det(A1 ⊗ A2) = det(A1)^d2 det(A2)^d1
            structured = d2 * self.factors[0].log_abs_det() + d1 * self.factors[1].log_abs_det()
        else:
            structured = self.factors[0].log_abs_det()
        return structured if self.channel_log_scale is None else structured + self.channel_log_scale.sum()

    # With channel scales, B D's singular values are not B's times D's: those three ask the dense matrix,
    # except the conditioning guard's number on a wide map, which takes the bound cond(B) cond(D).
    def condition_number(self) -> float:
        if self.channel_log_scale is not None and self.dim <= DENSE_CONDITION_LIMIT:
            return super().condition_number()
        with torch.no_grad():
            conds = [_condition_of(f.matrices()) for f in self.factors]
            if self.channel_log_scale is not None:
                conds.append(float(torch.exp(self.channel_log_scale.max() - self.channel_log_scale.min())))
        return math.prod(conds)

    def smallest_singular_value(self) -> torch.Tensor:
        if self.channel_log_scale is not None:
            return super().smallest_singular_value()
        mins = [torch.linalg.svdvals(f.matrices().float()).min() for f in self.factors]
        return mins[0] * mins[1] if self.kronecker else mins[0]

    @torch.no_grad()
    def singular_values(self) -> torch.Tensor:
        if self.channel_log_scale is not None:
            return super().singular_values()
        # Those of B (the premix is orthogonal): per block, or the outer product of the Kronecker factors'.
        sigmas = [torch.linalg.svdvals(f.matrices().detach().double()).reshape(-1) for f in self.factors]
        return torch.outer(sigmas[0], sigmas[1]).reshape(-1) if self.kronecker else sigmas[0]

    def extra_repr(self) -> str:
        premix = "" if self.premix is None else ", premix=hadamard"
        scales = "" if self.channel_log_scale is None else ", channel_scales=True"
        return f"dim={self.dim}, parametrization={self.parametrization}, shift={self.bias is not None}{premix}{scales}"


class _Tiled(Transform):
    """One map t tiled over a (num_heads, head_dim) layout, as a Kronecker product with an identity:
    Headwise is I (x) t (t on each head's features), AcrossHeads is t (x) I (t across the heads at each
    feature). Subclasses say how the layout is turned so that t acts along the last dim, and back."""

    def __init__(self, transform: Transform, copies: int) -> None:
        super().__init__(transform.dim * copies, orthogonal=transform.orthogonal)
        self.transform = transform
        self.copies = copies

    def _to_map_axis(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _from_map_axis(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    def _tiled(self, m: torch.Tensor) -> torch.Tensor:
        """The dim x dim matrix of t's matrix m tiled over the layout."""
        raise NotImplementedError

    def _through(self, apply: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self._from_map_axis(apply(self._to_map_axis(x)), x.shape)

    @property
    def shift(self) -> torch.Tensor | None:
        b = self.transform.shift
        return None if b is None else self._from_map_axis(b.expand(self.copies, b.numel()), torch.Size([self.dim]))

    def matrix(self) -> torch.Tensor:
        return self._tiled(self.transform.matrix())

    def inverse_matrix(self) -> torch.Tensor:
        return self._tiled(self.transform.inverse_matrix())

    def apply_cost(self) -> int:
        return self.copies * self.transform.apply_cost()

    def apply_matrix(self, x: torch.Tensor) -> torch.Tensor:
        return self._through(self.transform.apply_matrix, x)

    def apply_inverse_matrix(self, y: torch.Tensor) -> torch.Tensor:
        return self._through(self.transform.apply_inverse_matrix, y)

    def fold_into(self, weight: torch.Tensor) -> torch.Tensor:
        return self._through(self.transform.fold_into, weight)

    def log_abs_det(self) -> torch.Tensor:
        return self.copies * self.transform.log_abs_det()

    def condition_number(self) -> float:
        return self.transform.condition_number()

    def singular_values(self) -> torch.Tensor:
        return self.transform.singular_values().repeat(self.copies)

    def smallest_singular_value(self) -> torch.Tensor:
        return self.transform.smallest_singular_value()


class Headwise(_Tiled):
    """blockdiag(t, ..., t) over num_heads heads: one head_dim map shared by every head (the v->o map)."""

    def __init__(self, transform: Transform, num_heads: int) -> None:
        super().__init__(transform, num_heads)

    @property
    def num_heads(self) -> int:
        return self.copies

    def _to_map_axis(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.num_heads, self.transform.dim)

    def _from_map_axis(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return y.reshape(shape)

    def _tiled(self, m: torch.Tensor) -> torch.Tensor:
        return torch.block_diag(*[m] * self.num_heads)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


class AcrossHeads(_Tiled):
    """t (x) I over a (num_heads, head_dim) layout: one num_heads x num_heads map mixing the heads at each
    feature, the same at every feature (FlatQuant's o_trans before o_proj)."""

    def __init__(self, transform: Transform, head_dim: int) -> None:
        super().__init__(transform, head_dim)

    @property
    def head_dim(self) -> int:
        return self.copies

    def _to_map_axis(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.transform.dim, self.head_dim).transpose(-1, -2)

    def _from_map_axis(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return y.transpose(-1, -2).reshape(shape)

    def _tiled(self, m: torch.Tensor) -> torch.Tensor:
        return torch.kron(m, torch.eye(self.head_dim, dtype=m.dtype, device=m.device))

    def extra_repr(self) -> str:
        return f"num_heads={self.transform.dim}, head_dim={self.head_dim}"


TRANSFORMS: dict[str, type[Transform]] = {
    "identity": Identity,
    "hadamard": Hadamard,
    "block_hadamard": BlockHadamard,
    "rotation": Rotation,
    "affine": Affine,
}


def _family(family: str) -> type[Transform]:
    if family not in TRANSFORMS:
        raise ValueError(f"unknown transform family {family!r}; choose one of {sorted(TRANSFORMS)}")
    return TRANSFORMS[family]


def transform_kwargs(family: str) -> set[str]:
    """The keyword arguments a family accepts besides dim (what a config may set)."""
    params = inspect.signature(_family(family).__init__).parameters
    return {name for name in params if name not in ("self", "dim")}


def build_transform(family: str, dim: int, **kwargs) -> Transform:
    """Instantiate a family, passing only the kwargs it accepts (so a shared seed can go to all)."""
    accepted = transform_kwargs(family)
    return _family(family)(dim, **{k: v for k, v in kwargs.items() if k in accepted})
