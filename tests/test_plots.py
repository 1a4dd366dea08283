"""Figures: per run (saved by experiment.py) and for the tables (drawn by make_tables), PNG and PDF."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_tables import fp_and_methods, write_run

from latmix import figures, record, report

ROLES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def per_layer_rows(blocks: int = 30) -> list[dict]:
    """SmolLM2-135M's shape: 30 blocks x 7 linears = 210 quantization points."""
    rows = []
    for block in range(blocks):
        for index, role in enumerate(ROLES):
            bound = (1 + block) * (1 + index)
            rows.append({"layer": f"model.layers.{block}.{role}", "block": block,
                         "bound_before": bound, "bound_after": 0.6 * bound,
                         "error_before": 0.3 * bound, "error_after": 0.2 * bound,
                         "tightness_before": 0.3, "tightness_after": 1 / 3, "cond": 1.5,
                         "heldout_bound_before": None, "loss_before": 0.1, "loss_after": 0.05})
    return rows


def write_run_with_layers(results_dir: Path, transform: str, seed: int = 0, **kw) -> dict:
    rec = write_run(results_dir, transform, seed=seed, **kw)
    rec["calibration"]["per_layer"] = per_layer_rows()
    record.write_record(record.record_path(results_dir, rec["run_id"]), rec)
    return rec


def assert_written(paths) -> None:
    for path in paths:
        assert Path(path).exists() and Path(path).stat().st_size > 0, path


def test_per_layer_figure_has_one_panel_per_linear_role_with_a_point_per_block():
    fig = figures.per_layer_figure(per_layer_rows(), title="tiny · mxfp4 · affine+gptq · seed 0 · run abc")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().split(" ")[0] for ax in panels] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"]
    down = panels[-1]
    assert all(ax.get_yscale() == "log" for ax in panels)
    assert [line.get_linestyle() for line in down.lines] == ["--", "-", "--", "-"]  # bound dashed, error solid
    assert all(len(line.get_xdata()) == 30 for line in down.lines)
    assert "run abc" in fig.get_suptitle()


def test_methods_figure_draws_each_runs_bound_dashed_and_error_solid_in_one_colour_per_role():
    smaller = [{**row, "bound_after": row["bound_after"] / 2, "error_after": row["error_after"] / 4}
               for row in per_layer_rows()]
    fig = figures.methods_per_layer_figure({"identity": per_layer_rows(), "latmix": smaller})
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"]
    down = panels[-1]
    assert [line.get_label() for line in down.lines] == ["identity: bound", "identity: error",
                                                         "latmix: bound", "latmix: error"]
    assert [line.get_linestyle() for line in down.lines] == ["--", "-", "--", "-"]
    assert down.lines[0].get_color() == down.lines[1].get_color() != down.lines[2].get_color()
    assert list(down.lines[3].get_ydata()) == [row["error_after"] for row in smaller if row["layer"].endswith("down_proj")]


def test_methods_figure_without_measurements_says_so():
    with pytest.raises(ValueError, match="none of the runs"):
        figures.methods_per_layer_figure({"a": [{"layer": "x", "loss_before": 1.0}]})


def test_bound_vs_error_keeps_the_call_experiment_makes(tmp_path):
    path = figures.bound_vs_error(per_layer_rows(), tmp_path / "run" / "bound_vs_error.png")
    assert path == tmp_path / "run" / "bound_vs_error.png"
    assert_written([path])


def test_bound_vs_error_without_measurements_says_so(tmp_path):
    with pytest.raises(ValueError, match="no bound or error"):
        figures.bound_vs_error([{"layer": "x", "loss_before": 1.0}], tmp_path / "f.png")


def test_activation_histograms_keep_the_call_experiment_makes(tmp_path):
    torch = pytest.importorskip("torch")
    acts = {"model.layers.0.mlp.down_proj": torch.randn(4, 64)}
    path = figures.activation_histograms(acts, {k: 2 * v for k, v in acts.items()}, tmp_path / "acts.png")
    assert_written([path])


def test_make_tables_draws_a_metrics_figure_per_table_and_a_per_layer_figure_in_png_and_pdf(tmp_path):
    fp_and_methods(tmp_path)
    rec = write_run_with_layers(tmp_path, "hadamard", heldout=11.5)
    paths, messages = report.regenerate(tmp_path, tmp_path / "out", figures=True)
    assert messages == []
    figure_dir = tmp_path / "out" / "figures"
    expected = [figure_dir / f"{stem}.{fmt}" for stem in ("tiny_metrics", f"per_layer_{rec['run_id']}")
                for fmt in ("png", "pdf")]
    assert sorted(p for k, p in paths.items() if k.startswith("figure")) == sorted(expected)
    assert_written(expected)


def test_per_layer_figures_default_to_one_seed_per_configuration_capped(tmp_path):
    for seed in (0, 1):
        write_run_with_layers(tmp_path, "affine", seed=seed)
    write_run_with_layers(tmp_path, "rotation")
    write_run_with_layers(tmp_path, "hadamard")
    paths, messages = report.regenerate(tmp_path, tmp_path / "out", figures=True, max_layer_figures=2)
    assert len([k for k in paths if k.startswith("figure per_layer")]) == 2 * 2  # png + pdf
    assert messages == ["per-layer figures for 2 of 3 configurations with per-layer data; choose runs with --run-id"]


def test_a_chosen_run_is_drawn_and_an_unknown_one_reported(tmp_path):
    rec = write_run_with_layers(tmp_path, "affine")
    write_run(tmp_path, "hadamard")
    paths, messages = report.regenerate(tmp_path, tmp_path / "out", figures=True, run_ids=[rec["run_id"], "nope"])
    assert f"figure per_layer_{rec['run_id']}.pdf" in paths
    assert messages == ["--run-id nope: no such record"]


def test_the_figure_and_table_modules_import_no_torch():
    code = "import sys, latmix.figures, latmix.tables; print(sorted(m for m in sys.modules if m.startswith('torch')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
