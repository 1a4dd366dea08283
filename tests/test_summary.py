"""The summary a run and a sweep end with: metrics, deltas vs full precision, stage times, 110 columns."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import run_script

from latmix import record, summary
from latmix.callbacks import MARKER, read_sweep

BASE_CONFIG = {
    "model": {"name": "tiny", "name_or_path": "/models/tiny", "dtype": "float32"},
    "quant": {"name": "mxfp4", "weight_format": "mxfp4", "act_format": "mxfp4", "block_size": 32,
              "weight_quantizer": "gptq", "kv_format": None},
    "transform": {"name": "affine", "placements": {"residual": {"family": "affine", "parametrization": "qr"}},
                  "seed": 0},
    "calib": {"steps": 8, "seed": 0},
    "eval": {"suite": "local", "max_seq_len": 256, "ppl_datasets": ["heldout"]},
    "seed": 0,
}
FP_QUANT = {"name": "none", "weight_format": None, "act_format": None, "block_size": 32, "weight_quantizer": "rtn",
            "kv_format": None}


def make_record(transform="affine", quant="mxfp4", seed=0, ppl=20.0, acc=0.5, edits=None, run_id=None):
    config = copy.deepcopy(BASE_CONFIG)
    config["seed"], config["transform"]["seed"], config["calib"]["seed"] = seed, seed, seed
    config["transform"]["name"] = transform
    if quant == "none":
        config["quant"] = dict(FP_QUANT)
    for key, value in (edits or {}).items():
        group, name = key.split(".", 1)
        config[group][name] = value
    rid = run_id or record.run_id(config)
    return {
        "schema_version": record.SCHEMA_VERSION, "run_id": rid, "created": "2026-01-01T00:00:00+00:00",
        "git_sha": None, "config": config, "model": "tiny", "quant": quant, "transform": transform,
        "weight_quantizer": config["quant"]["weight_quantizer"], "seed": seed,
        "metrics": {"ppl": {"heldout": ppl}, "tasks": {"tiny_hellaswag": {"acc": acc, "acc_norm": acc + 0.1}},
                    "averages": {"mean": acc + 0.1}},
        "calibration": {"per_layer": []},
        "timing": {"load": 1.0, "transform": 2.0, "calibrate": 30.0, "quantize": 4.0, "evaluate": 5.0, "total": 42.0},
        "env": {},
    }


def write(results_dir: Path, rec: dict) -> dict:
    record.write_record(record.record_path(results_dir, rec["run_id"]), rec)
    return rec


def assert_fits(text: str) -> None:
    assert all(len(line) <= summary.WIDTH for line in text.splitlines()), max(text.splitlines(), key=len)


def test_a_run_summary_has_metrics_deltas_vs_full_precision_and_stage_times(tmp_path):
    fp = write(tmp_path, make_record("identity", "none", ppl=15.0, acc=0.6))
    write(tmp_path, make_record("identity", "none", ppl=99.0, edits={"eval.max_seq_len": 128}))  # another evaluation
    rec = write(tmp_path, make_record(ppl=20.0, acc=0.5))
    text = summary.run_summary(rec, tmp_path)
    assert_fits(text)
    lines = text.splitlines()
    assert lines[0] == f"run {rec['run_id']} · tiny · mxfp4 · affine+gptq · seed 0"
    assert any(line.split() == ["heldout", "ppl", "20.00", "15.00", "+5.00"] for line in lines), text
    assert any(line.split() == ["tiny_hellaswag", "60.00", "70.00", "-10.00"] for line in lines), text
    assert any(line.split() == ["avg", "(all)", "60.00", "70.00", "-10.00"] for line in lines), text
    assert f"full precision: mean of 1 record(s) ({fp['run_id']})" in text
    assert "stage times (s): load 1.0 · transform 2.0 · calibrate 30.0 · quantize 4.0 · evaluate 5.0 · total 42.0" in text
    assert str(record.record_path(tmp_path, rec["run_id"])) in text
    assert "measurement" not in text  # the record has no measure_seconds


def test_the_run_summary_gives_the_measurements_share_of_the_run(tmp_path):
    rec = make_record()
    rec["calibration"]["measure_seconds"] = 4.2
    assert "bound/error measurement (in calibrate): 4.2 s, 10% of the run" in summary.run_summary(rec, tmp_path)


def test_the_run_summary_says_where_learned_clipping_ratios_ended(tmp_path):
    rec = make_record()
    rec["calibration"]["clipping"] = {"weight": {"min": 0.9, "mean": 0.975, "max": 0.99}}
    text = summary.run_summary(rec, tmp_path)
    assert "learned weight clipping ratios: 0.900 to 0.990, mean 0.975" in text
    assert "act clipping" not in text


def test_without_a_full_precision_record_the_summary_says_how_to_get_one(tmp_path):
    rec = write(tmp_path, make_record())
    text = summary.run_summary(rec, tmp_path)
    assert_fits(text)
    assert "full precision" not in text.splitlines()[1]  # no reference column
    assert "quant=none transform=identity" in text
    fp = write(tmp_path, make_record("identity", "none"))
    assert "this run is the full-precision reference" in summary.run_summary(fp, tmp_path)


def test_long_lines_wrap_within_110_columns(tmp_path):
    deep = tmp_path / ("d" * (100 - len(str(tmp_path)) - len("/runs/0123456789ab.json")))
    rec = make_record()
    rec["timing"] = {f"a_long_stage_name_{i}": 10.0 * i for i in range(8)}
    write(deep, rec)
    text = summary.run_summary(rec, deep)
    assert_fits(text)
    assert str(record.record_path(deep, rec["run_id"])) in text  # a path is never cut
    assert "a_long_stage_name_7 70.0" in text


def test_a_sweep_summary_has_one_row_per_job_skipped_and_failed_included(tmp_path):
    write(tmp_path, make_record("identity", "none", ppl=15.0))
    done = [write(tmp_path, make_record(seed=s, ppl=20.0 + s, edits={"calib.steps": steps}))
            for s, steps in ((0, 8), (1, 8), (0, 16))]
    jobs = [summary.Job(0, done[0]["run_id"], "ran", record=done[0]),
            summary.Job(1, done[1]["run_id"], "recorded", record=done[1]),
            summary.Job(2, done[2]["run_id"], "ran", record=done[2]),
            summary.Job(3, "0123456789ab", "failed", error="RuntimeError: out of memory"),
            summary.Job(4, None, "unfinished")]
    text = summary.sweep_summary(jobs, tmp_path)
    assert_fits(text)
    lines = text.splitlines()
    assert lines[0] == "sweep: 5 jobs (2 ran, 1 recorded, 1 failed, 1 unfinished) · tiny · mxfp4 · affine+gptq"
    header = lines[1].split()
    assert header[:5] == ["#", "run", "status", "calib", "steps"] and "Δ" in header
    row = lines[3].split()
    assert row[:5] == ["0", done[0]["run_id"], "ran", "8", "0"] and "+5.00" in row
    assert lines[4].split()[2] == "recorded"
    assert lines[6].split() == ["3", "0123456789ab", "failed"]
    assert "#3 failed: RuntimeError: out of memory" in text


def test_many_differing_settings_move_below_the_table(tmp_path):
    edits = {f"calib.some_long_hyperparameter_name_{i}": f"value-{i}" for i in range(6)}
    jobs = []
    for n in range(3):
        rec = write(tmp_path, make_record(seed=n, edits={k: f"{v}-{n}" for k, v in edits.items()}))
        jobs.append(summary.Job(n, rec["run_id"], "ran", record=rec))
    text = summary.sweep_summary(jobs, tmp_path)
    assert_fits(text)
    assert "#0: calib some_long_hyperparameter_name_0=value-0-0" in text


def test_a_sweep_does_not_show_learning_settings_of_runs_that_learned_nothing(tmp_path):
    # identity keeps the default calib.mode end_to_end but has nothing to learn; affine here learns nothing
    # by its calib.mode none: neither was trained, so the mode is no difference between them
    identity = make_record("identity", edits={"calib.mode": "end_to_end", "calib.smooth_alpha": 0.0})
    affine = make_record("affine", edits={"calib.mode": "none", "calib.smooth_alpha": 0.5})
    jobs = []
    for n, rec in enumerate((identity, affine)):
        rec["calibration"]["skipped"] = "nothing to learn"
        jobs.append(summary.Job(n, write(tmp_path, rec)["run_id"], "ran", record=rec))
    header = summary.sweep_summary(jobs, tmp_path).splitlines()[1]
    assert "smooth_alpha" in header and "mode" not in header


def test_the_callback_reads_the_markers_of_a_sweep(tmp_path):
    rec = write(tmp_path / "results", make_record())
    for number, status in ((0, "ran"), (1, "recorded")):
        (tmp_path / "sweep" / str(number)).mkdir(parents=True)
        (tmp_path / "sweep" / str(number) / MARKER).write_text(json.dumps(
            {"run_id": rec["run_id"], "results_dir": str(tmp_path / "results"), "status": status, "error": None}))
    (tmp_path / "sweep" / "2").mkdir()
    jobs, results_dir = read_sweep(tmp_path / "sweep")
    assert [(job.number, job.status, job.record is not None) for job in jobs] == [
        (0, "ran", True), (1, "recorded", True), (2, "unfinished", False)]
    assert results_dir == tmp_path / "results"


@pytest.mark.slow
def test_a_sweep_ends_with_one_table_of_its_runs_recorded_ones_included(tiny_checkpoint, tmp_path):
    common = ["model=tiny", f"model.name_or_path={tiny_checkpoint}", f"paths.results_dir={tmp_path}", "logger=none",
              "quant.weight_quantizer=rtn", "eval=quick", "eval.max_seq_len=256", "eval.max_ppl_tokens=512",
              "eval.limit=4", "transform=identity"]
    first = run_script("run.py", "-m", *common, "quant=none,mxfp4", f"hydra.sweep.dir={tmp_path}/sweep1")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_script("run.py", "-m", *common, "quant=mxfp4,mxfp8", f"hydra.sweep.dir={tmp_path}/sweep2")
    assert second.returncode == 0, second.stderr[-3000:]

    text = (tmp_path / "sweep2" / "summary.txt").read_text()
    assert text in second.stdout + "\n"
    assert_fits(text)
    lines = text.splitlines()
    assert lines[0] == "sweep: 2 jobs (1 ran, 1 recorded) · tiny · identity+rtn"
    assert f"sweep directory: {tmp_path}/sweep2" in text
    rows = {line.split()[3]: line.split() for line in lines[3:5]}
    assert rows["mxfp4"][2] == "recorded" and rows["mxfp8"][2] == "ran"
    assert "Δ heldout" in lines[1]  # the full-precision run of the first sweep is the reference
    # Each run's own log ended with its summary table.
    run_log = next((tmp_path / "sweep2" / "1").glob("*.log")).read_text()
    assert "summary" in run_log and "full precision" in run_log
