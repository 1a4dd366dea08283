"""Transform families: one interface, exact algebra, invertible by construction, gradients flow."""

import pytest
import torch

from latmix import transforms
from latmix.settings import AFFINE_PARAMETRIZATIONS
from latmix.transforms import (
    TRANSFORMS,
    AcrossHeads,
    Affine,
    BlockHadamard,
    Hadamard,
    Headwise,
    build_transform,
    skew_exp,
    transform_kwargs,
)

DIM = 96  # 12 * 8: exercises the non-power-of-two Hadamard and 3 MX blocks of 32

FAMILY_CASES = [
    ("identity", {}),
    ("hadamard", {"seed": 3}),
    ("block_hadamard", {}),
    ("rotation", {"seed": 3}),
    ("rotation", {"learnable": True, "init": "hadamard"}),
    *[("affine", {"parametrization": p, "init": "random", "shift": True}) for p in AFFINE_PARAMETRIZATIONS],
    ("affine", {"parametrization": "block_diag", "init": "block_hadamard", "shift": True, "premix": "hadamard"}),
    ("affine", {"parametrization": "kronecker", "init": "hadamard", "premix": "hadamard"}),
    ("affine", {"parametrization": "kronecker", "init": "random", "factor": "svd", "channel_scales": True}),
    ("affine", {"parametrization": "block_diag", "init": "block_hadamard", "premix": "hadamard", "channel_scales": True}),
]


def _ids(case):
    family, kwargs = case
    return "-".join([family, *(str(v) for v in kwargs.values())])


def _perturbed(family: str, kwargs: dict, scale: float = 0.05):
    """A transform moved away from its initialization, so the algebra is tested on a generic point."""
    transform = build_transform(family, DIM, **kwargs)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in transform.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return transform


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(params=FAMILY_CASES, ids=_ids)
def transform(request):
    family, kwargs = request.param
    return _perturbed(family, kwargs)


def test_forward_is_x_times_a_transpose_plus_shift(transform):
    x = torch.randn(4, 7, DIM)
    a, b = transform.matrix(), transform.shift
    expected = x @ a.T + (0 if b is None else b)
    torch.testing.assert_close(transform(x), expected, atol=2e-5, rtol=1e-5)


def test_inverse_undoes_forward(transform):
    x = torch.randn(4, 7, DIM)
    torch.testing.assert_close(transform.inverse(transform(x)), x, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(transform.matrix() @ transform.inverse_matrix(), torch.eye(DIM), atol=2e-5, rtol=0)


def test_fold_into_preserves_a_linear_up_to_the_shift(transform):
    weight, x = torch.randn(5, DIM), torch.randn(3, DIM)
    folded = transform.fold_into(weight)
    shift_term = 0 if transform.shift is None else folded @ transform.shift
    torch.testing.assert_close(transform(x) @ folded.T - shift_term, x @ weight.T, atol=1e-4, rtol=1e-5)


def test_log_abs_det_condition_number_and_regularizer_match_the_matrix(transform):
    a = transform.matrix().double()
    log_det = torch.linalg.slogdet(a).logabsdet
    assert transform.log_abs_det().item() == pytest.approx(log_det.item(), abs=1e-3)
    assert transform.regularizer().item() == pytest.approx(log_det.item() ** 2, abs=1e-3)
    assert transform.condition_number() == pytest.approx(torch.linalg.cond(a).item(), rel=1e-3)


def test_orthogonal_families_have_orthogonal_matrices(transform):
    if transform.orthogonal:
        a = transform.matrix()
        torch.testing.assert_close(a @ a.T, torch.eye(DIM), atol=2e-5, rtol=0)
        assert transform.condition_number() == 1.0


@pytest.mark.parametrize("parametrization", AFFINE_PARAMETRIZATIONS)
@pytest.mark.parametrize("init", ["identity", "hadamard", "random"])
def test_affine_starts_exactly_at_its_initialization(parametrization, init):
    affine = Affine(DIM, parametrization=parametrization, init=init, seed=5)
    a = affine.matrix()
    if init == "identity":
        torch.testing.assert_close(a, torch.eye(DIM))
    torch.testing.assert_close(a @ a.T, torch.eye(DIM), atol=2e-5, rtol=0)
    assert affine.log_abs_det().abs().item() < 1e-5


def test_affine_hadamard_init_is_the_hadamard_transform():
    affine = Affine(DIM, parametrization="qr", init="hadamard", seed=5)
    torch.testing.assert_close(affine.matrix(), Hadamard(DIM, seed=5).matrix(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("parametrization", AFFINE_PARAMETRIZATIONS)
def test_gradients_reach_every_affine_parameter(parametrization):
    affine = _perturbed("affine", {"parametrization": parametrization, "init": "hadamard", "shift": True})
    x = torch.randn(8, DIM)
    loss = (affine(x) ** 2).sum() + affine.inverse(x).pow(2).sum() + affine.regularizer()
    loss.backward()
    for name, param in affine.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("parametrization", AFFINE_PARAMETRIZATIONS)
def test_learning_scales_only_trains_the_per_channel_scales_and_keeps_the_start(parametrization):
    affine = Affine(DIM, parametrization=parametrization, init="hadamard", shift=True, learn="scales", block_size=32)
    trained = {name for name, param in affine.named_parameters() if param.requires_grad}
    assert trained and all(name.endswith("log_scale") for name in trained)
    torch.testing.assert_close(affine.matrix(), Affine(DIM, parametrization=parametrization, init="hadamard",
                                                       block_size=32).matrix())
    assert not any(p.requires_grad for p in Affine(DIM, learnable=False, learn="scales").parameters())


@pytest.mark.parametrize("scale", [0.0, 0.01, 3.0], ids=["at-zero", "small", "large"])
def test_skew_exp_has_matrix_exps_value_and_gradient(scale):
    """At zero all eigenvalues tie; at scale 3 the angles wrap past pi: the gradient must hold at both."""
    g = (scale * torch.randn(3, 24, 24, dtype=torch.float64)).requires_grad_()
    reference = g.detach().clone().requires_grad_()
    upstream = torch.randn(3, 24, 24, dtype=torch.float64)
    value = skew_exp(g)
    expected = torch.linalg.matrix_exp((reference - reference.mT) / 2)
    (value * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(value, expected, atol=0, rtol=0)
    torch.testing.assert_close(g.grad, reference.grad, atol=1e-10, rtol=1e-8)


def test_skew_exp_gradient_passes_gradcheck():
    g = (0.5 * torch.randn(2, 6, 6, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(skew_exp, (g,))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_skew_exp_gradient_on_cuda_matches_matrix_exp():
    g = (0.3 * torch.randn(4, 64, 64, device="cuda")).requires_grad_()
    reference = g.detach().clone().requires_grad_()
    upstream = torch.randn(4, 64, 64, device="cuda")
    (skew_exp(g) * upstream).sum().backward()
    (torch.linalg.matrix_exp((reference - reference.mT) / 2) * upstream).sum().backward()
    torch.testing.assert_close(g.grad, reference.grad, atol=1e-4, rtol=1e-4)


def test_learnable_rotation_stays_orthogonal_and_trains():
    rotation = build_transform("rotation", DIM, learnable=True, init="hadamard")
    params = list(rotation.parameters())
    assert params, "a learnable rotation has parameters"
    optimizer = torch.optim.SGD(params, lr=0.1)
    x = torch.randn(16, DIM)
    before = rotation.matrix().detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        rotation(x)[:, :4].pow(2).sum().backward()
        optimizer.step()
    a = rotation.matrix()
    assert not torch.allclose(a, before)
    torch.testing.assert_close(a @ a.T, torch.eye(DIM), atol=1e-5, rtol=0)


def test_fixed_families_have_no_trainable_parameters():
    for family in ("identity", "hadamard", "block_hadamard", "rotation"):
        assert not any(p.requires_grad for p in build_transform(family, DIM).parameters()), family
    assert not any(p.requires_grad for p in Affine(DIM, learnable=False).parameters())


def test_block_hadamard_is_block_diagonal_with_the_mx_block():
    a = BlockHadamard(DIM, block_size=32).matrix()
    assert torch.count_nonzero(a[:32, 32:]) == 0
    torch.testing.assert_close(a[:32, :32].abs(), torch.full((32, 32), 32**-0.5))


def test_kronecker_affine_is_the_kronecker_product_of_its_factors():
    affine = _perturbed("affine", {"parametrization": "kronecker", "kron_factors": (8, 12)})
    first, second = (f.matrices()[0] for f in affine.factors)
    torch.testing.assert_close(affine.matrix(), torch.kron(first, second))


def test_headwise_is_the_block_diagonal_of_one_head_map():
    head = _perturbed("affine", {"parametrization": "qr", "shift": True})
    headwise = Headwise(head, num_heads=3)
    torch.testing.assert_close(headwise.matrix(), torch.block_diag(*[head.matrix()] * 3))
    x = torch.randn(2, 3 * DIM)
    expected = x @ headwise.matrix().T + head.shift.repeat(3)
    torch.testing.assert_close(headwise(x), expected, atol=2e-5, rtol=1e-5)
    assert headwise.log_abs_det().item() == pytest.approx(3 * head.log_abs_det().item(), rel=1e-5)


def test_across_heads_mixes_the_heads_at_each_feature_with_one_map():
    # FlatQuant's o_trans: x laid out (heads, head_dim), one heads x heads map applied at every feature.
    heads = _perturbed_at(3, "affine", {"parametrization": "qr", "shift": True})
    across = AcrossHeads(heads, head_dim=DIM)
    torch.testing.assert_close(across.matrix(), torch.kron(heads.matrix(), torch.eye(DIM)))
    x = torch.randn(2, 3 * DIM)
    expected = x @ across.matrix().T + heads.shift.repeat_interleave(DIM)
    torch.testing.assert_close(across(x), expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(across.inverse(across(x)), x, atol=2e-5, rtol=1e-5)
    weight = torch.randn(5, 3 * DIM)
    torch.testing.assert_close(across.fold_into(weight) @ across.apply_matrix(x).T, weight @ x.T, atol=1e-4, rtol=1e-4)
    assert across.log_abs_det().item() == pytest.approx(DIM * heads.log_abs_det().item(), rel=1e-5)
    dense = torch.linalg.svdvals(across.matrix().detach().double())
    assert torch.allclose(across.singular_values().sort().values, dense.sort().values, rtol=1e-5)
    assert across.condition_number() == pytest.approx(float(dense.max() / dense.min()), rel=1e-4)
    assert across.apply_cost() == DIM * 3 * 3


def _perturbed_at(dim: int, family: str, kwargs: dict, scale: float = 0.05):
    transform = build_transform(family, dim, **kwargs)
    with torch.no_grad():
        for param in transform.parameters():
            param.add_(scale * torch.randn(param.shape))
    return transform


def test_build_transform_passes_only_the_kwargs_a_family_takes():
    hadamard = build_transform("hadamard", DIM, seed=4, learnable=True, parametrization="qr")
    assert isinstance(hadamard, Hadamard)
    assert transform_kwargs("hadamard") == {"seed"}
    assert {"parametrization", "init", "shift"} <= transform_kwargs("affine")


def test_registry_holds_the_five_families():
    assert set(TRANSFORMS) == {"identity", "hadamard", "block_hadamard", "rotation", "affine"}


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: build_transform("givens", DIM), "unknown transform family"),
        (lambda: build_transform("hadamard", 156), "block_hadamard"),
        (lambda: build_transform("block_hadamard", DIM, block_size=64), "must divide"),
        (lambda: build_transform("affine", DIM, parametrization="cholesky"), "unknown affine parametrization"),
        (lambda: build_transform("rotation", DIM, learnable=True, parametrization="qr"), "unknown rotation parametrization"),
        (lambda: build_transform("affine", DIM, init="orthogonal"), "unknown init"),
        (lambda: build_transform("affine", DIM, parametrization="kronecker", kron_factors=(5, 20)), "multiply"),
        (lambda: build_transform("affine", DIM, parametrization="block_diag", factor="qz"), "factor parametrization"),
        (lambda: build_transform("identity", 0), "positive dimension"),
        (lambda: build_transform("affine", DIM, premix="fourier"), "unknown affine premix"),
        (lambda: build_transform("affine", DIM, learn="mixing"), "unknown affine learn 'mixing'.*'all', 'scales'"),
    ],
)
def test_bad_input_is_a_clear_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_singular_values_from_the_structure_are_those_of_the_matrix(transform):
    # The per-layer measurement takes ||A^-1|| and the condition number from these, never from A itself.
    dense = torch.linalg.svdvals(transform.matrix().detach().double())
    assert torch.allclose(transform.singular_values().sort().values, dense.sort().values, rtol=1e-5)
    # The bound objective's sigma_min: the same, in float32, with a gradient for learned affine maps.
    sigma_min = transform.smallest_singular_value()
    assert float(sigma_min.detach()) == pytest.approx(float(dense.min()), rel=1e-4)
    learned = not transform.orthogonal and any(p.requires_grad for p in transform.parameters())
    assert sigma_min.requires_grad == learned
    headwise = Headwise(transform, 3)
    dense = torch.linalg.svdvals(headwise.matrix().detach().double())
    assert torch.allclose(headwise.singular_values().sort().values, dense.sort().values, rtol=1e-5)


def test_apply_cost_counts_the_structure():
    # Multiply-adds per row: what calibration weighs against folding a map into a weight.
    assert build_transform("identity", DIM).apply_cost() == 0
    assert build_transform("rotation", DIM).apply_cost() == DIM * DIM
    assert build_transform("block_hadamard", DIM, block_size=32).apply_cost() == DIM * 32
    assert build_transform("affine", DIM, parametrization="block_diag", block_size=16).apply_cost() == DIM * 16
    assert build_transform("affine", DIM, parametrization="kronecker", init="hadamard").apply_cost() == DIM * 20
    assert build_transform("hadamard", DIM).apply_cost() < DIM * 32
    assert Headwise(build_transform("rotation", 32), 3).apply_cost() == 3 * 32 * 32


def test_affine_premix_is_the_learned_map_after_a_fixed_hadamard():
    B = _perturbed("affine", {"parametrization": "block_diag", "init": "block_hadamard", "seed": 5})
    A = _perturbed("affine", {"parametrization": "block_diag", "init": "block_hadamard", "seed": 5, "premix": "hadamard"})
    H = Hadamard(DIM, seed=5 + 7919).matrix()
    assert torch.allclose(A.matrix(), B.matrix() @ H, atol=1e-5)
    assert not any(p.requires_grad for p in A.premix.parameters())
    assert A.log_abs_det() == B.log_abs_det()


def test_affine_channel_scales_scale_each_input_channel_before_the_map():
    # FlatQuant's add_diag: A = B diag(d), so x -> B (d * x), and log|det A| = log|det B| + sum log d.
    kwargs = {"parametrization": "kronecker", "init": "random", "factor": "svd", "seed": 5}
    B = _perturbed("affine", kwargs)
    A = build_transform("affine", DIM, **kwargs, channel_scales=True)
    A.load_state_dict({**B.state_dict(), "channel_log_scale": torch.linspace(-1, 1, DIM)})
    d = torch.exp(torch.linspace(-1, 1, DIM))
    torch.testing.assert_close(A.matrix(), B.matrix() @ torch.diag(d), atol=1e-5, rtol=1e-5)
    assert A.log_abs_det().item() == pytest.approx(B.log_abs_det().item() + float(d.log().sum()), abs=1e-4)
    assert "channel_log_scale" in {n for n, p in Affine(DIM, channel_scales=True, learn="scales").named_parameters()
                                   if p.requires_grad}
    torch.testing.assert_close(build_transform("affine", DIM, **kwargs, channel_scales=True).matrix(),
                               build_transform("affine", DIM, **kwargs).matrix())  # it starts at 1


def test_a_wide_map_with_channel_scales_bounds_its_condition_number_from_the_structure(monkeypatch):
    # Above the dense limit the guard gets cond(B) cond(D) >= cond(B D), never a dense SVD of the map.
    A = _perturbed("affine", {"parametrization": "kronecker", "init": "random", "factor": "svd",
                              "channel_scales": True})
    exact = A.condition_number()
    monkeypatch.setattr(transforms, "DENSE_CONDITION_LIMIT", DIM - 1)
    scale = A.channel_log_scale.detach()
    B_cond = A.condition_number() / float(torch.exp(scale.max() - scale.min()))
    assert A.condition_number() >= exact
    assert B_cond == pytest.approx(float(torch.linalg.cond(A._assemble(A._matrices()).detach().double())), rel=1e-4)
