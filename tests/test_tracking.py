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

    logged = read_offline_run(run_dir, wait_for_exit=30)
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


# --- names for ablations, failed runs, artifacts, the offline sync hint ---------------------------

RESOLVED = {
    "model": {"name": "tiny", "name_or_path": "/models/tiny"},
    "quant": {"name": "mxfp4", "weight_format": "mxfp4", "act_format": "mxfp4", "weight_quantizer": "gptq"},
    "transform": {"name": "affine", "placements": {"residual": {"family": "affine", "parametrization": "qr"}},
                  "seed": 0},
    "optim": {"lr": 0.001},
    "eval": {"suite": "local"},
    "seed": 0,
    "paths": {"results_dir": "/tmp/results"},
}


def identity_of(resolved=RESOLVED, overrides=(), seed=0, **kwargs):
    resolved = {**resolved, "seed": seed, "transform": {**resolved["transform"], "seed": seed}}
    return tracking.run_identity(
        resolved, run_id="abc", model="tiny", quant="mxfp4", transform="affine", weight_quantizer="gptq",
        seed=seed, overrides=list(overrides), group_names=["model", "quant", "transform", "optim", "hydra/launcher"],
        **kwargs,
    )


def test_seeds_of_one_configuration_share_a_group_and_other_settings_do_not():
    seed0, seed1 = identity_of(seed=0), identity_of(seed=1)
    assert seed0.group == seed1.group and seed0.group.startswith("tiny-mxfp4-affine+gptq-")
    other = {**RESOLVED, "optim": {"lr": 0.01}}
    assert identity_of(other, overrides=["optim.lr=0.01"]).group != seed0.group
    assert identity_of(group="mine").group == "mine"  # logger.group wins


def test_job_type_is_the_method_and_names_carry_what_was_changed():
    base = identity_of(overrides=["transform=affine", "seed=0", "paths.results_dir=/x/y", "hydra/launcher=slurm"])
    assert base.job_type == "affine+gptq"
    assert base.name.startswith("tiny-mxfp4-affine+gptq-s0-")  # group choices, seed, paths: not hyperparameters
    assert {"tiny", "mxfp4", "affine", "gptq", "affine+gptq"} <= set(base.tags)

    lr = identity_of({**RESOLVED, "optim": {"lr": 0.01}}, overrides=["optim.lr=0.01"])
    assert "optim.lr=0.01" in lr.name and "optim.lr=0.01" in lr.tags
    param = identity_of(
        {**RESOLVED, "transform": {**RESOLVED["transform"], "placements": {"residual": {"family": "affine",
                                                                                        "parametrization": "lu"}}}},
        overrides=["transform.placements.residual.parametrization=lu"],
    )
    assert "residual.parametrization=lu" in param.name
    assert len({base.name, lr.name, param.name}) == 3
    # The same overrides on different configurations (a preset changed in between): still different names.
    assert identity_of(overrides=["optim.lr=0.01"]).name != lr.name


def test_changed_settings_keep_hyperparameters_only():
    overrides = ["+experiment=ablation_affine", "model=tiny", "hydra/launcher=slurm", "seed=3", "force=true",
                 "paths.results_dir=/a/b", "logger.mode=offline", "device=cuda", "calib.offload=true",
                 "model.name_or_path=/data/models/llama", "quant.weight_quantizer=rtn", "calib.steps=4",
                 "~calib.seq_len", "transform.placements.attn_vo.shift=false"]
    assert tracking.changed_settings(overrides, ["model", "experiment"]) == [
        ("model.name_or_path", "llama"), ("calib.steps", "4"), ("attn_vo.shift", "false"),
    ]


class Interrupted(Exception):
    """What latmix.interrupt raises on a signal (the tracker knows it by name and attributes)."""

    def __init__(self, signum: int, checkpoint=None) -> None:
        import signal

        self.signum = signum
        self.signal = signal.Signals(signum).name
        self.checkpoint = checkpoint
        super().__init__(f"interrupted by {self.signal}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def offline_run(tmp_path: Path, body) -> dict:
    """Run `body(tracker)` inside an offline tracker's block; return what the run file holds."""
    import wandb

    tracker = tracking.Tracker("offline", "latmix-test", None, tmp_path / "wandb")
    tracker.start("run", {"seed": 0}, "group", ["tiny"], job_type="affine+gptq")
    run_dir = tracker.run_dir
    try:
        with tracker:
            body(tracker)
    except BaseException as err:  # the test looks at what the tracker made of it
        caught = err
    else:
        caught = None
    wandb.teardown()  # everything the service process holds is on disk
    logged = read_offline_run(run_dir, wait_for_exit=30)
    logged["caught"] = caught
    return logged


@pytest.mark.parametrize(
    ("error", "exit_code", "status"),
    [
        (ValueError("bad value"), 1, "failed"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (Interrupted(15, "/ckpt/calibration.pt"), 143, "interrupted"),
    ],
)
def test_a_run_that_raises_is_marked_failed_with_its_error(no_credentials, tmp_path, error, exit_code, status):
    def body(tracker):
        tracker.log_summary({"metrics": {"ppl": {"heldout": 1.0}}})
        raise error

    logged = offline_run(tmp_path, body)
    assert logged["caught"] is error  # the tracker never swallows the error
    assert logged["exit_code"] == exit_code != 0
    assert logged["summary"]["status"] == status
    assert logged["summary"]["error"].startswith(type(error).__name__)
    assert logged["job_type"] == "affine+gptq"
    if isinstance(error, Interrupted):
        assert logged["summary"]["signal"] == "SIGTERM" and logged["summary"]["checkpoint"] == "/ckpt/calibration.pt"
        assert not logged["preempting"]  # not in a Slurm job


def test_a_config_error_after_the_start_is_a_failed_run(no_credentials, tmp_path):
    from latmix.errors import ConfigError

    def body(tracker):
        raise ConfigError("quant.block_size: 24 does not divide hidden_size=256")

    logged = offline_run(tmp_path, body)
    assert logged["exit_code"] == 1 and logged["summary"]["status"] == "failed"
    assert "does not divide" in logged["summary"]["error"]


def test_a_slurm_preemption_is_marked_preempting(no_credentials, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1234")

    def body(tracker):
        raise Interrupted(10)  # SIGUSR1: submitit's time-limit signal

    logged = offline_run(tmp_path, body)
    assert logged["preempting"] and logged["summary"]["status"] == "preempted"
    assert logged["exit_code"] == 138


def test_a_finished_run_logs_its_record_config_and_transforms_and_says_how_to_sync(no_credentials, tmp_path, caplog):
    record_path = tmp_path / "abc.json"
    record_path.write_text('{"run_id": "abc"}')
    transforms = tmp_path / "abc.safetensors"
    transforms.write_bytes(b"\0" * 8)
    rec = {"run_id": "abc", "metrics": {"ppl": {"heldout": 12.5}}, "timing": {"total": 3.0}, "fidelity": {},
           "calibration": {"per_layer": [], "steps": 0, "loss_before": 0.25, "loss_after": 0.25,
                           "skipped": "no learnable parameter (every transform is fixed)"},
           "env": {"cpu": "Intel(R) Xeon(R) Processor", "threads": 1}}

    def body(tracker):
        tracker.log_transforms("abc", transforms)
        tracker.log_transforms("abc", None)  # nothing learned: no artifact
        tracker.log_record(rec, record_path, "seed: 0\n")

    with caplog.at_level(logging.INFO, logger="latmix.tracking"):
        logged = offline_run(tmp_path, body)
    assert logged["exit_code"] == 0 and logged["summary"]["metrics/ppl/heldout"] == 12.5
    # whether anything was learned is a column of its own: the config's calib.mode does not say
    assert logged["summary"]["calibration/learned"] is False and logged["summary"]["calibration/loss_after"] == 0.25
    assert logged["summary"]["calibration/skipped"].startswith("no learnable parameter")
    # where it ran, to filter a group's runs by (a thread count moves a quantized run's numbers)
    assert logged["summary"]["env/threads"] == 1 and logged["summary"]["env/cpu"] == "Intel(R) Xeon(R) Processor"
    assert logged["artifacts"]["record-abc"] == {"type": "result", "files": ["config.yaml", "record.json"]}
    assert logged["artifacts"]["transforms-abc"] == {"type": "transforms", "files": ["transforms.safetensors"]}
    (run_dir,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")  # the path conf/logger/wandb.yaml names
    assert f"upload it with: wandb sync {run_dir}" in caplog.text


@pytest.mark.slow
def test_a_run_that_fails_after_the_tracker_started_is_a_failed_wandb_run(no_credentials, tiny_checkpoint, tmp_path):
    import wandb
    from hydra import compose, initialize_config_dir

    from latmix.errors import ConfigError
    from latmix.experiment import run

    root = Path(__file__).resolve().parent.parent
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=tiny", f"model.name_or_path={tiny_checkpoint}", f"paths.results_dir={tmp_path}", "logger.mode=offline",
            "transform=identity", "quant.weight_quantizer=rtn", "calib.n_samples=2", "calib.seq_len=64",
            "eval=quick", "eval.max_seq_len=128", "eval.max_ppl_tokens=16",  # fewer tokens than one window
        ])
    with pytest.raises(ConfigError, match="fewer than one window"):
        run(cfg)
    wandb.teardown()
    (run_dir,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    logged = read_offline_run(run_dir, wait_for_exit=30)
    assert logged["exit_code"] == 1 and logged["summary"]["status"] == "failed"
    assert "fewer than one window" in logged["summary"]["error"]
    assert logged["job_type"] == "identity+rtn" and logged["name"].startswith("tiny-mxfp4-identity+rtn-s0-")
    assert logged["group"].startswith("tiny-mxfp4-identity+rtn-")
