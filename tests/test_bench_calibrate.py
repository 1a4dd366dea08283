"""scripts/bench_calibrate.py and scripts/gpu_check.sh: their rows and budget (no timing is asserted)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script

bench_calibrate = load_script("bench_calibrate")
ROOT = Path(__file__).resolve().parent.parent


def small_args(**overrides) -> argparse.Namespace:
    args = {"blocks": 2, "vocab": 64, "samples": 2, "micro_batch": None, "seq_len": 16, "steps": 3, "device": "cpu",
            "dtype": torch.float32}  # fmt: skip
    return argparse.Namespace(**args | overrides)


def test_an_end_to_end_row_has_its_step_the_fp_forward_backward_and_their_ratio():
    row = bench_calibrate.bench_one(128, "affine qr", bench_calibrate.TRANSFORMS["affine qr"], "end_to_end", small_args())
    assert (row["d"], row["blocks"], row["tokens/step"], row["micro-batch"]) == (128, 2, 32, 2)
    assert row["s/step"] > 0 and row["FP fwd+bwd s"] > 0
    # the row's seconds are rounded to 0.1 ms for the table, so their ratio is the ratio only nearly
    assert row["x FP"] == pytest.approx(row["s/step"] / row["FP fwd+bwd s"], rel=0.05)


def test_a_layer_wise_row_in_micro_batches_has_no_ratio_to_the_whole_model():
    spec = bench_calibrate.TRANSFORMS["affine block_diag"]
    row = bench_calibrate.bench_one(128, "affine block_diag", spec, "layer_wise", small_args(micro_batch=1))
    assert row["s/step"] > 0 and row["x FP"] == "" and row["micro-batch"] == 1


def test_a_row_that_runs_out_of_device_memory_says_so_and_the_sweep_goes_on(monkeypatch):
    def out_of_memory(*_):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bench_calibrate, "measure", out_of_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    row = bench_calibrate.bench_one(4096, "rotation", bench_calibrate.TRANSFORMS["rotation"], "end_to_end", small_args())
    assert row["s/step"] == "out of memory" and row["d"] == 4096


def test_gpu_check_runs_no_step_once_its_budget_is_spent(tmp_path):
    out = tmp_path / "gpu"
    subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(out), "0"],
        cwd=ROOT, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, capture_output=True, check=True,
    )  # fmt: skip
    summary = (out / "summary.txt").read_text()
    for step in ("pytest_cuda", "run_tiny", "calib_8b", "bench_mx", "calib_sizes", "skew_exp"):
        assert f"{step}: not run (the budget is spent)" in summary
    assert sorted(p.name for p in out.iterdir()) == ["summary.txt"]
