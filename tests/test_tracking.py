"""W&B tracking: mode resolution, offline runs that can be read back, and failures that never stop a run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from wandb_offline import read_offline_run

from latmix import tracking


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "absent-netrc"))


def test_auto_mode_is_offline_without_credentials(no_credentials):
    assert tracking.resolve_mode("auto") == "offline"


def test_auto_mode_is_online_with_an_api_key(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.resolve_mode("auto") == "online"


def test_auto_mode_is_online_with_a_netrc_entry(no_credentials, tmp_path):
    netrc = tmp_path / ".netrc"
    netrc.write_text(f"machine {tracking.WANDB_HOST}\n  login user\n  password {'x' * 40}\n")
    netrc.chmod(0o600)
    assert tracking.resolve_mode("auto") == "online"


def test_explicit_modes_pass_through():
    assert [tracking.resolve_mode(m) for m in ("online", "offline", "disabled")] == ["online", "offline", "disabled"]


def test_config_is_flattened_into_columns():
    assert tracking.flatten({"quant": {"block_size": 32, "kv_format": None}, "seed": 0, "empty": {}}) == {
        "quant.block_size": 32, "quant.kv_format": None, "seed": 0, "empty": {}
    }
    assert tracking.flatten({"metrics": {"ppl": {"heldout": 3.0}}}, sep="/") == {"metrics/ppl/heldout": 3.0}


def test_an_offline_run_holds_summary_config_group_and_tags(no_credentials, tmp_path):
    tracker = tracking.Tracker("auto", "latmix-test", None, tmp_path / "wandb")
    tracker.start("tiny-mxfp4-affine-s0", {"quant": {"block_size": 32}, "seed": 0}, "sweep-1", ["tiny", "affine"])
    run_dir = Path(tracker.run.dir).parent  # the offline run's folder, where its .wandb file goes
    tracker.log_step({"step": 1, "loss": 0.5})
    tracker.log_calibration([{"layer": "layers.0.q", "loss_before": 2.0, "loss_after": 1.0, "bound_after": 0.5}])
    tracker.log_summary({"metrics": {"ppl": {"heldout": 12.5}}, "run_id": "abc"})
    tracker.finish()

    logged = read_offline_run(run_dir)
    assert logged["summary"]["metrics/ppl/heldout"] == 12.5
    assert logged["summary"]["run_id"] == "abc"
    assert logged["summary"]["calibration/loss"] == 0.5
    assert logged["summary"]["calibration/per_layer/_type"] == "table-file"
    assert logged["summary"]["calibration/per_layer/nrows"] == 1
    assert logged["summary"]["calibration/bound_vs_error_table/_type"] == "table-file"
    assert logged["config"]["quant.block_size"] == 32
    assert logged["group"] == "sweep-1"
    assert sorted(logged["tags"]) == ["affine", "tiny"]
    assert run_dir.is_relative_to(tmp_path / "wandb")


def test_a_wandb_failure_is_a_warning_and_later_calls_are_no_ops(no_credentials, tmp_path, monkeypatch, caplog):
    import wandb

    def broken_init(**_kwargs):
        raise RuntimeError("server unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    tracker = tracking.Tracker("online", "latmix-test", None, tmp_path / "wandb")
    with caplog.at_level(logging.WARNING, logger="latmix.tracking"):
        tracker.start("run", {}, None, [])
        tracker.log_summary({"a": 1})
        tracker.finish()
    assert "W&B start failed (RuntimeError: server unreachable)" in caplog.text
    assert tracker.run is None


def test_disabled_mode_writes_nothing(tmp_path):
    tracker = tracking.Tracker("disabled", "latmix-test", None, tmp_path / "wandb")
    tracker.start("run", {}, None, [])
    tracker.log_summary({"a": 1})
    tracker.finish()
    assert not (tmp_path / "wandb").exists()
