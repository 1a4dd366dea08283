"""scripts/probe_descent.py: the KL along the straight-through gradient, the sign step and random steps."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_script

from latmix.config import compose_experiment

probe_descent = load_script("probe_descent")

TINY = ["model=tiny", "quant=mxfp4", "transform=affine", "calib.n_samples=8", "calib.seq_len=64",
        "calib.batch_size=4", "logger=none", "device=cpu"]


@pytest.fixture(scope="module")
def lens():
    return probe_descent.Probe(compose_experiment(TINY))


def test_probing_a_step_leaves_the_maps_where_they_started(lens):
    start = {name: p.detach().clone() for name, p in lens.params.items()}
    at_start = lens.kls_at({name: torch.zeros_like(p) for name, p in lens.params.items()}, 0.0)
    moved = lens.kls_at({name: torch.ones_like(p) for name, p in lens.params.items()}, 1e-2)
    assert all(torch.equal(p, start[name]) for name, p in lens.params.items())
    assert lens.kls_at({name: torch.zeros_like(p) for name, p in lens.params.items()}, 0.0) == at_start
    assert moved != at_start and all(v > 0 for v in at_start)


def test_the_sign_step_is_adams_first_step_and_its_first_order_change_is_minus_the_gradients_l1():
    result = probe_descent.probe(compose_experiment(TINY), steps=[1e-3], randoms=1)
    rows = {row["direction"]: row for row in result["rows"]}
    assert list(rows) == ["sign", "gradient", "random 1"]
    assert rows["sign"]["first_order_pct"] == pytest.approx(-100 * 1e-3 * result["gradient_l1"] / result["kl_batch"])
    assert rows["gradient"]["first_order_pct"] < 0  # -g is downhill to first order
    assert all(math.isfinite(row[key]) for row in rows.values() for key in ("batch_pct", "others_pct"))
    assert result["other_sequences"] == 4 and result["parameters"] > 0
    assert result["repeat_pct"] == [0.0, 0.0]  # the same maps give the same KL
    table = probe_descent.report(result, "cmd")
    assert "| sign | 0.001 |" in table and "| random 1 | 0.001 |" in table


def test_a_preset_with_nothing_to_learn_or_no_sequences_beside_the_batch_is_refused():
    with pytest.raises(SystemExit, match="has nothing to learn"):
        probe_descent.Probe(compose_experiment([*TINY, "transform=block_hadamard"]))
    with pytest.raises(SystemExit, match=r"calib.n_samples=4 leaves no sequences beside the first batch"):
        probe_descent.Probe(compose_experiment([*TINY, "calib.n_samples=4"]))


def test_under_the_noise_objective_the_gradient_predicts_the_change_and_rounding_is_reported_beside():
    """The same noise draws at every point make the objective nearly smooth in the maps (only a value
    crossing into another binade changes its noise's width): a step along the gradient changes it about
    as the gradient says, and tiny steps hardly move it. Round to nearest's KL is reported beside."""
    result = probe_descent.probe(compose_experiment([*TINY, "calib.rounding=noise"]), steps=[1e-7, 1e-4],
                                 randoms=1, draws=2)
    assert (result["rounding"], result["draws"], result["repeat_pct"]) == ("noise", 2, [0.0, 0.0])
    rows = {(row["direction"], row["step"]): row for row in result["rows"]}
    sign = rows["sign", 1e-4]
    assert sign["batch_pct"] < 0 and sign["batch_pct"] == pytest.approx(sign["first_order_pct"], rel=0.3)
    assert all(abs(rows[name, 1e-7]["batch_pct"]) < 0.05 for name in ("sign", "gradient", "random 1"))
    assert all(math.isfinite(row["nearest_others_pct"]) for row in result["rows"])
    assert result["kl_others_nearest"] != result["kl_others"]
    assert "rounding to nearest % |" in probe_descent.report(result, "cmd")
