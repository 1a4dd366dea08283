"""scripts/bench_pipeline.py: its tables (no timing is asserted: timings never go in tests)."""

from __future__ import annotations

import pytest
from conftest import load_script

TINY = [
    "model=tiny", "device=cpu", "calib.n_samples=4", "calib.batch_size=2", "calib.seq_len=64",
    "eval.max_seq_len=128", "eval.max_ppl_tokens=256", "eval.ppl_datasets=[heldout]",
]


bench_pipeline = load_script("bench_pipeline")


@pytest.mark.slow
def test_tables_on_the_tiny_model():
    report = bench_pipeline.bench(TINY, presets=("identity", "affine"), repeats=1)
    stages = [row[0] for row in report.rows]
    assert stages == [
        "transform", "calib step", "calib step, later epochs", "calibrate", "learning", "fold maps", "GPTQ", "quantized ppl",
        "run (sum of stages)", "measurement",
    ]
    for stage, seconds, _, fp_seconds, ratio, _ in report.rows:
        assert seconds > 0, stage
        if fp_seconds is not None:
            assert ratio == seconds / fp_seconds
    assert [row[0] for row in report.presets] == ["identity", "affine"]
    assert all(value > 0 for row in report.presets for value in row[1:])
    text = report.render()
    assert "model=tiny quant=mxfp4 transform=affine_literal" in text
    assert "| calib step" in text and "| transform preset" in text


def test_verdicts_read_each_goal_its_way():
    verdict = bench_pipeline._verdict
    assert verdict("calib step", 3.0, 1.9, "n") == "<= 2x: met; n"
    assert verdict("quantized ppl", 3.0, 1.6, "") == "<= 1.5x: NOT met"
    assert verdict("GPTQ", 75.0, 2.0, "") == "< 60 s: NOT met"
    assert verdict("measurement", 1.0, 0.05, "") == "<= 10%: met"
    assert verdict("calibrate", 1.0, None, "8 steps") == "8 steps"


def test_report_rows_ratios_and_render():
    report = bench_pipeline.Report(header="model=x")
    report.row("calib step", 3.0, "FP forward+backward", 2.0, "median of 4")
    report.row("calibrate", 30.0, "", None, "8 steps")
    report.row("GPTQ", 12.0, "FP forward", 4.0)
    report.presets = [["identity", 0.1, 1.0, 2.1, 1.0, 2.1]]
    assert report.rows[0][4] == 1.5 and report.rows[0][5] == "<= 2x: met; median of 4"
    assert report.rows[1][3:] == [None, None, "8 steps"]
    assert report.rows[2][4] == 3.0 and report.rows[2][5] == "< 60 s: met"
    text = report.render()
    assert text.splitlines()[0] == "model=x"
    assert "| calib step" in text and "| identity" in text and "stage / FP forward" in text
