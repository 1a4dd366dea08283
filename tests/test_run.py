"""The pipeline end to end: one run writes a valid record; reruns skip; force reruns; sweeps; W&B offline.

Every test here runs the whole pipeline (seconds on an idle CPU on a random tiny Llama, shrunk
calibration and evaluation), so all are marked slow; `make test` runs them.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_script
from hydra import compose, initialize_config_dir
from wandb_offline import read_offline_run

from latmix import experiment, provenance, record
from latmix.config import identity_config
from latmix.errors import ConfigError
from latmix.experiment import run

ROOT = Path(__file__).resolve().parent.parent
STAGES = {"load", "transform", "calibrate", "quantize", "evaluate", "total"}


def shrunk(tiny_checkpoint: Path, results_dir: Path) -> list[str]:
    """Overrides that keep the pipeline whole but make it take seconds on a random tiny model."""
    return [
        "model=tiny", f"model.name_or_path={tiny_checkpoint}", "transform=affine_literal",
        f"paths.results_dir={results_dir}",
        "quant.weight_quantizer=rtn",
        "calib.n_samples=4", "calib.seq_len=64", "calib.batch_size=2", "calib.steps=2",
        "eval=quick", "eval.max_seq_len=256", "eval.max_ppl_tokens=512", "eval.limit=4",
    ]


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent-netrc"))


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.slow
def test_one_run_writes_a_valid_record_then_skips_then_reruns_when_forced(
    tiny_checkpoint, tmp_path, caplog, monkeypatch
):
    overrides = [*shrunk(tiny_checkpoint, tmp_path), "logger=none"]
    rec = run(compose_run(*overrides))

    path = record.record_path(tmp_path, rec["run_id"])
    assert record.read_record(path) == json.loads(json.dumps(rec))
    assert (rec["model"], rec["quant"], rec["transform"], rec["weight_quantizer"]) == ("tiny", "mxfp4", "affine_literal", "rtn")
    assert set(rec["timing"]) == STAGES and all(v >= 0 for v in rec["timing"].values())
    assert rec["metrics"]["ppl"]["heldout"] > 1
    assert set(rec["metrics"]["tasks"]) == {"tiny_lambada", "tiny_hellaswag", "tiny_wordorder"}
    assert rec["calibration"]["per_layer"] and rec["calibration"]["data_sha256"]
    assert rec["fidelity"]["after_calibration"]["kl"] >= 0  # the literal T1 is approximate: measured
    assert rec["eval"]["lm_eval_version"] and rec["env"]["torch"]
    assert rec["git_uncommitted"] == record.uncommitted_code()  # [] on a clean checkout, None outside git
    # A run reproduces bit for bit on one machine only: the record names the processor and its kernels.
    assert rec["env"]["cpu"] and rec["env"]["cpu_capability"] and rec["env"]["threads"] >= 1
    assert (tmp_path / "outputs" / rec["run_id"] / "activations.png").exists()

    written = path.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="latmix.experiment"):
        again = run(compose_run(*overrides))
    assert again == record.read_record(path) and path.stat().st_mtime_ns == written
    assert "already recorded" in caplog.text and "the code is now at" not in caplog.text

    if rec["git_sha"] is not None:  # a later commit reuses the record, and says which commit made it
        monkeypatch.setattr(record, "running_code", lambda: record.CodeVersion("f" * 40, []))
        with caplog.at_level("INFO", logger="latmix.experiment"):
            assert run(compose_run(*overrides)) == again
        assert f"recorded at commit {rec['git_sha'][:9]}, the code is now at fffffffff" in caplog.text
        monkeypatch.undo()

    forced = run(compose_run(*overrides, "force=true"))
    assert forced["run_id"] == rec["run_id"] and path.stat().st_mtime_ns != written
    assert forced["metrics"]["ppl"] == pytest.approx(rec["metrics"]["ppl"])  # seeded: reproducible


@pytest.fixture
def code_read_afresh():
    """record.running_code is read once per process: these tests need it read at their own run's start."""
    record.running_code.cache_clear()
    yield
    record.running_code.cache_clear()


@pytest.mark.slow
def test_a_record_names_the_code_its_run_started_with_though_the_checkout_moves_during_it(
    tiny_checkpoint, tmp_path, monkeypatch, code_read_afresh
):
    monkeypatch.setattr(record, "git_sha", lambda repo_dir=None: "a" * 40)
    monkeypatch.setattr(record, "uncommitted_code", lambda: [])
    evaluate = experiment.evaluate

    def commit_and_edit_meanwhile(*args, **kwargs):
        monkeypatch.setattr(record, "git_sha", lambda repo_dir=None: "b" * 40)
        monkeypatch.setattr(record, "uncommitted_code", lambda: ["latmix/mx.py"])
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(experiment, "evaluate", commit_and_edit_meanwhile)
    overrides = [*shrunk(tiny_checkpoint, tmp_path), "logger=none", "transform=identity", "eval.tasks=[]"]
    first = run(compose_run(*overrides))
    second = run(compose_run(*overrides, "seed=1"))  # a sweep's next run shares the process's imported code

    for rec in (first, second):
        assert (rec["git_sha"], rec["git_uncommitted"]) == ("a" * 40, [])


@pytest.mark.slow
def test_a_recorded_run_whose_texts_changed_stops_naming_them_and_force_reruns_it(tiny_checkpoint, tmp_path):
    calib_text, eval_text = tmp_path / "calib.txt", tmp_path / "mine.txt"
    calib_text.write_text((ROOT / "data" / "text" / "calibration.txt").read_text())
    eval_text.write_text((ROOT / "data" / "text" / "heldout.txt").read_text())
    overrides = [*shrunk(tiny_checkpoint, tmp_path), "logger=none", "transform=identity", "eval.tasks=[]",
                 f"calib.path={calib_text}", f"eval.ppl_datasets=[{eval_text}]"]
    rec = run(compose_run(*overrides))
    assert rec["calibration"]["text"]["sha256"] == sha256(calib_text.read_bytes()).hexdigest()
    assert rec["eval"]["ppl_sources"]["mine"]["sha256"] == sha256(eval_text.read_bytes()).hexdigest()
    assert rec["model_source"]["fingerprint"] == provenance.model_fingerprint(str(tiny_checkpoint))
    path = record.record_path(tmp_path, rec["run_id"])
    written = path.read_bytes()

    eval_text.write_text(eval_text.read_text()[::-1])
    calib_text.write_text(calib_text.read_text().upper())
    with pytest.raises(ConfigError) as stopped:
        run(compose_run(*overrides))
    message = str(stopped.value)
    assert f"eval.ppl_datasets entry 'mine' ({eval_text}) has changed" in message
    assert f"the calibration text ({calib_text}) has changed" in message
    assert "force=true" in message and path.read_bytes() == written  # nothing lost

    forced = run(compose_run(*overrides, "force=true"))
    assert forced["run_id"] == rec["run_id"] and forced["metrics"]["ppl"] != rec["metrics"]["ppl"]
    assert run(compose_run(*overrides)) == record.read_record(path)  # the new texts' record is reused


@pytest.mark.slow
def test_a_corrupted_record_is_replaced_by_a_rerun(tiny_checkpoint, tmp_path):
    overrides = [*shrunk(tiny_checkpoint, tmp_path), "logger=none", "transform=identity"]
    rid = record.run_id(identity_config(compose_run(*overrides)))
    path = record.record_path(tmp_path, rid)
    path.parent.mkdir(parents=True)
    path.write_text("{truncated")
    rec = run(compose_run(*overrides))
    assert rec["run_id"] == rid and record.read_record(path)["transform"] == "identity"


@pytest.mark.slow
def test_an_offline_wandb_run_holds_the_records_metrics(tiny_checkpoint, tmp_path, offline_wandb):
    import wandb

    rec = run(compose_run(*shrunk(tiny_checkpoint, tmp_path), "transform=hadamard"))
    # The .wandb file is written by wandb's service process: stop it so everything it holds is on disk
    # (offline summaries have gone missing before that: wandb/wandb#7227; failed once here too).
    wandb.teardown()
    run_dirs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    logged = read_offline_run(run_dirs[0], wait_for_exit=30)
    assert logged["summary"]["metrics/ppl/heldout"] == pytest.approx(rec["metrics"]["ppl"]["heldout"])
    assert logged["summary"]["timing/total"] == pytest.approx(rec["timing"]["total"])
    assert logged["config"]["run_id"] == rec["run_id"]
    assert set(logged["tags"]) >= {"tiny", "mxfp4", "hadamard"}


@pytest.mark.slow
def test_a_wandb_failure_never_loses_the_run(tiny_checkpoint, tmp_path, monkeypatch):
    import wandb

    def unreachable(**_kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", unreachable)
    rec = run(compose_run(*shrunk(tiny_checkpoint, tmp_path), "transform=identity", "logger.mode=online"))
    assert record.read_record(record.record_path(tmp_path, rec["run_id"]))["transform"] == "identity"


@pytest.mark.slow
def test_an_offloaded_layer_wise_run_records_what_the_resident_run_records(tiny_checkpoint, tmp_path):
    overrides = [
        *shrunk(tiny_checkpoint, tmp_path), "logger=none", "transform=flatquant", "quant.weight_quantizer=gptq",
    ]
    resident = run(compose_run(*overrides))
    offloaded = run(compose_run(*overrides, "calib.offload=true"))
    assert offloaded["run_id"] != resident["run_id"]
    assert offloaded["metrics"] == resident["metrics"]
    assert offloaded["calibration"]["loss_after"] == resident["calibration"]["loss_after"]


@pytest.mark.slow
def test_learned_block_affine_maps_halve_the_kl_and_stay_near_block_hadamard_on_the_outlier_model(tmp_path):
    """LATMiX's maps learned on real text: the trained tiny Llama with planted outliers, MXFP4 W4A4 (RTN).

    What holds: learning halves the calibration KL to the full-precision model (measured 0.0235 ->
    0.0105). What does not hold robustly: the perplexity ordering against block_hadamard. Held-out ppl
    full precision 169.60, block_hadamard 171.74; affine_block 171.38 (0.83x block_hadamard's increase)
    before commit 59054d7, 172.00 (1.12x) after it; that commit changes only float rounding of the
    forward (q/k/v share one quantized operand) and calib.online_maps=false gives the same 172.00. So the
    check is that the learned maps stay within a quarter of block_hadamard's cost, not that they beat it.
    """
    common = [
        "model=tiny_outliers", "eval=quick", "eval.max_ppl_tokens=8192", "logger=none",
        f"paths.results_dir={tmp_path}", "quant.weight_quantizer=rtn",
    ]
    fp, fixed, learned = (
        run(compose_run(*common, *overrides))
        for overrides in (
            ["quant=none", "transform=identity"],
            ["transform=block_hadamard"],
            ["transform=affine_block", "calib.n_samples=128", "calib.epochs=2", "optim.lr=5e-3"],
        )
    )
    calibration = learned["calibration"]
    assert calibration["loss_after"] < 0.5 * calibration["loss_before"], calibration
    fp, fixed, learned = (rec["metrics"]["ppl"]["heldout"] for rec in (fp, fixed, learned))
    assert learned - fp < 1.25 * (fixed - fp), (fp, fixed, learned)


@pytest.mark.slow
def test_a_sweep_over_three_transforms_writes_three_records_and_a_three_row_table(tiny_checkpoint, tmp_path):
    out = run_script("run.py", "-m", *shrunk(tiny_checkpoint, tmp_path), "logger=none",
              "transform=identity,hadamard,affine_literal", "hydra/launcher=local", f"hydra.sweep.dir={tmp_path}/sweep")
    assert out.returncode == 0, out.stderr[-3000:]
    records = [r for r in record.iter_records(tmp_path) if isinstance(r, dict)]
    assert sorted(r["transform"] for r in records) == ["affine_literal", "hadamard", "identity"]
    assert len({r["run_id"] for r in records}) == 3

    out = run_script("scripts/make_tables.py", "--results-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(tmp_path / "tables" / "results.csv")
    assert sorted(table["method"]) == ["affine_literal+rtn", "hadamard+rtn", "identity+rtn"]


@pytest.mark.slow
def test_the_default_command_quantizes_smollm2_with_latmix_and_gptq_end_to_end(tmp_path):
    out = run_script("run.py", f"paths.results_dir={tmp_path}", f"hydra.run.dir={tmp_path}/out")
    assert out.returncode == 0, out.stderr[-3000:]
    (rec,) = [r for r in record.iter_records(tmp_path) if isinstance(r, dict)]
    assert (rec["model"], rec["quant"], rec["transform"]) == ("smollm2-135m", "mxfp4", "affine")
    assert rec["config"]["quant"]["weight_quantizer"] == "gptq"
    assert rec["calibration"]["skipped"] and rec["calibration"]["smoothed"] > 0  # the measured LATMiX start
    rows = rec["calibration"]["per_layer"]
    assert len(rows) == 30 * 7  # every quantized linear of the real model: the bound holds at each
    assert all(0 < r["error_after"] <= r["bound_after"] and 0 < r["heldout_error_after"] <= r["heldout_bound_after"]
               for r in rows)
    assert set(rec["timing"]) == STAGES  # the benchmark (README: at most 5 min on 2 idle cores) is read from here
    for stage in ("load", "calibrate", "quantize", "evaluate"):
        assert f"stage {stage}" in out.stdout + out.stderr  # the per-stage time is in the log
    assert list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
