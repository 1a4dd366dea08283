"""scripts/bound_report.py: the bound across runs, from records alone."""

from __future__ import annotations

import pytest
from conftest import load_script

bound_report = load_script("bound_report")


def record(transform: str, bound: float, error: float, ppl: float, seed: int = 0) -> dict:
    rows = [{"layer": f"layers.{i}.q", "bound_after": bound * (1 + i), "error_after": error * (1 + i),
             "heldout_bound_after": bound, "heldout_error_after": error} for i in range(2)]
    return {"model": "m", "quant": "mxfp4", "seed": seed, "run_id": f"{transform}{seed}", "transform": transform,
            "weight_quantizer": "gptq", "config": {"quant": {"weight_format": "mxfp4"}},
            "calibration": {"per_layer": rows}, "metrics": {"ppl": {"heldout": ppl}}}


def test_each_run_gets_its_mean_bound_error_tightness_and_breaks():
    table = bound_report.bound_table([record("a", 2.0, 1.0, 10.0), record("b", 1.0, 2.0, 20.0)])
    a, b = (table[table["method"] == m].iloc[0] for m in ("a+gptq", "b+gptq"))
    assert (a["points"], a["bound"], a["error"], a["least tightness"], a["bound < error"]) == (2, 3.0, 1.5, 0.5, 0)
    assert b["bound < error"] == 4  # both points, on calibration and held-out data


def test_rank_correlations_follow_the_runs_order():
    runs = [record("a", 1.0, 0.1, 10.0), record("b", 2.0, 0.2, 20.0), record("c", 3.0, 0.3, 15.0)]
    (row,) = bound_report.rank_correlations(bound_report.bound_table(runs)).to_dict("records")
    assert row["runs"] == 3 and row["bound vs error"] == pytest.approx(1.0)
    assert row["bound vs ppl"] == pytest.approx(0.5)


def test_rank_correlations_are_per_format_and_then_over_all_formats():
    runs = [record("a", 1.0, 0.1, 10.0), record("b", 2.0, 0.2, 20.0), record("c", 3.0, 0.3, 15.0)]
    other = [record("a", 9.0, 0.9, 90.0), record("b", 8.0, 0.8, 80.0), record("c", 7.0, 0.7, 70.0)]
    for rec in other:
        rec["quant"] = "nvfp4"
    rows = bound_report.rank_correlations(bound_report.bound_table(runs + other)).to_dict("records")
    assert [(r["quant"], r["runs"]) for r in rows] == [("mxfp4", 3), ("nvfp4", 3), ("all", 6)]
    assert rows[1]["bound vs ppl"] == pytest.approx(1.0)


def test_one_quantized_model_evaluated_twice_is_one_point_of_the_correlations():
    runs = [record("a", 1.0, 0.1, 10.0), record("b", 2.0, 0.2, 20.0), record("c", 3.0, 0.3, 15.0)]
    again = record("c", 3.0, 0.3, 15.0)
    again["config"]["eval"] = {"limit": None}
    again["run_id"] = "c0-all-items"
    table = bound_report.bound_table([*runs, again])
    assert len(table) == 4  # listed
    (row,) = bound_report.rank_correlations(table).to_dict("records")
    assert row["runs"] == 3 and row["bound vs ppl"] == pytest.approx(0.5)
    other_seed = record("c", 3.0, 0.3, 15.0, seed=1)
    assert bound_report.rank_correlations(bound_report.bound_table([*runs, other_seed]))["runs"].item() == 4


def test_records_without_per_layer_rows_are_left_out():
    rec = record("a", 1.0, 0.1, 10.0)
    rec["calibration"]["per_layer"] = []
    assert bound_report.bound_table([rec]).empty


def test_the_figure_of_chosen_runs_is_drawn_and_unknown_runs_are_named(tmp_path):
    from test_plots import write_run_with_layers

    ids = [write_run_with_layers(tmp_path, transform)["run_id"] for transform in ("identity", "affine")]
    path = bound_report.figure_of_runs(tmp_path, ids, tmp_path / "bound.png")
    assert path.stat().st_size > 0
    with pytest.raises(SystemExit, match="no record nope"):
        bound_report.figure_of_runs(tmp_path, [ids[0], "nope"], tmp_path / "bound.png")
