"""hydra/launcher=slurm and =local, and the requeue glue, specified against a real Slurm.

The `slurm` tests need the one-node cluster of scripts/slurm/start_local_slurm.sh (`make slurm-test`
and .ci/run start it). Most drive tests/slurm_app/app.py, a stand-in for run.py with the same
checkpoint-per-block shape that runs in seconds; the last one preempts run.py itself on a tiny model.
Both are launched as users launch sweeps, `python ... -m hydra/launcher=slurm` in a subprocess, each
test with its own submitit folder and results dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from latmix.preemption import RequeueLimitError, check_requeue_limit, slurm_task
from latmix.record import EXECUTION_CALIBRATION_KEYS

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests" / "slurm_app" / "app.py"
RUN_PY = REPO / "run.py"
SLURM_CONF = Path(os.environ.get("LATMIX_SLURM_DIR", "/tmp/latmix-slurm")) / "etc" / "slurm.conf"
# What the local cluster can give a job; everything else comes from conf/hydra/launcher/slurm.yaml.
LOCAL_CLUSTER_OVERRIDES = (
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
)
# Long enough that submitit reads a signal as a preemption, not as the time limit.
PREEMPTIBLE_TIMEOUT_MIN = 60


def app_command(tmp_path: Path, launcher: str, *overrides: str, app: Path = APP) -> list[str]:
    return [
        sys.executable,
        str(app),
        "-m",
        f"hydra/launcher={launcher}",
        f"hydra.searchpath=[file://{REPO / 'conf'}]",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"paths.results_dir={tmp_path / 'results'}",
        *overrides,
    ]


def records(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "results" / "runs").glob("*.json"))]


def attempts(tmp_path: Path) -> list[int]:
    """The block each start of the (single) run began at."""
    (log,) = (tmp_path / "results" / "attempts").glob("*.log")
    return [int(line) for line in log.read_text().split()]


def wait_for(
    condition: Callable[[], bool], what: str, timeout_s: float = 60, launch: subprocess.Popen | None = None
) -> None:
    """Wait until `condition()`; fail at once, with its output, if the `launch` command ends first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if launch is not None and launch.poll() is not None:
            pytest.fail(
                f"the sweep ended (status {launch.returncode}) before {what}:\n{launch.stdout.read()}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


# --- configuration and requeue logic (no cluster) ---


def compose_app_config(*overrides: str):
    with initialize_config_dir(str(APP.parent), version_base="1.3"):
        return compose(
            "config",
            overrides=[f"hydra.searchpath=[file://{REPO / 'conf'}]", *overrides],
            return_hydra_config=True,
        )


def test_slurm_launcher_settings_are_one_config_overridable_from_the_command_line():
    cfg = compose_app_config(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=quant",
        "hydra.launcher.qos=high",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.timeout_min=30",
        "hydra.launcher.array_parallelism=2",
        "hydra.launcher.signal_delay_s=60",
        "hydra.launcher.setup=[module load cuda]",
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["partition"] == "gpu"
    assert launcher["account"] == "quant"
    assert launcher["qos"] == "high"
    assert launcher["gpus_per_node"] == 4
    assert launcher["timeout_min"] == 30
    assert launcher["array_parallelism"] == 2
    assert launcher["signal_delay_s"] == 60
    assert launcher["setup"] == ["module load cuda"]
    assert launcher["max_num_timeout"] == 3
    assert {"cpus_per_task", "mem_gb", "additional_parameters"} <= launcher.keys()


def test_a_misspelled_slurm_setting_is_rejected():
    with pytest.raises(Exception, match="partiton"):
        compose_app_config("hydra/launcher=slurm", "hydra.launcher.partiton=gpu")


def test_requeues_up_to_the_limit_are_allowed_and_the_next_one_fails_saying_what_to_change():
    check_requeue_limit(restarts=3, limit=3)
    check_requeue_limit(restarts=50, limit=None)
    with pytest.raises(RequeueLimitError, match=r"requeued 4 times.*max_num_timeout=3.*relaunch"):
        check_requeue_limit(restarts=4, limit=3)


def test_slurm_task_changes_nothing_outside_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)

    @slurm_task
    def task(cfg):
        raise ValueError(f"bad {cfg}")

    with pytest.raises(ValueError) as failure:
        task("cfg")
    assert not getattr(failure.value, "__notes__", [])


def test_slurm_task_attaches_the_job_traceback_to_a_failure(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "43")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "42")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)

    @slurm_task
    def failing_task(cfg):
        raise ValueError("no such layer")

    with pytest.raises(ValueError) as failure:
        failing_task(None)
    (note,) = failure.value.__notes__
    assert "Traceback in Slurm job 42_1" in note
    assert "in failing_task" in note


def line_of(path: Path, code: str) -> int:
    """The number of the one line of `path` that contains `code`."""
    (number,) = [n for n, line in enumerate(path.read_text().splitlines(), 1) if code in line]
    return number


SCRIPT_WITH_A_SLURM_TASK = """\
import sys

import cloudpickle

from latmix.preemption import slurm_task


def calibrate(cfg):
    raise ValueError(f"bad block in {cfg}")


@slurm_task
def main(cfg):
    calibrate(cfg)


if __name__ == "__main__":
    with open(sys.argv[1], "wb") as out:
        cloudpickle.dump(main, out)  # what submitit does with the launcher that holds the task
"""


def test_a_scripts_slurm_task_unpickled_in_another_process_reports_the_scripts_file_and_lines(tmp_path):
    """The launcher cloudpickles the task function of the script being run (`__main__`) into the job.
    Pickled by value, cloudpickle >= 3.1.2 names its code `<dynamic-code>`: the job imports the script
    from its file instead, so the job's traceback says where it failed."""
    script = tmp_path / "scripts" / "my_run.py"
    script.parent.mkdir()
    script.write_text(SCRIPT_WITH_A_SLURM_TASK)
    pickled = tmp_path / "task.pkl"
    subprocess.run([sys.executable, str(script), str(pickled)], check=True, cwd=tmp_path)

    job = (
        "import pickle\n"
        f"task = pickle.loads(open({str(pickled)!r}, 'rb').read())\n"
        "try:\n    task('cfg-7')\n"
        "except ValueError as err:\n    print(err.__notes__[0])\n"
    )
    env = {**os.environ, "SLURM_JOB_ID": "7"}
    env.pop("SLURM_ARRAY_JOB_ID", None)
    env.pop("SLURM_RESTART_COUNT", None)
    job_run = subprocess.run(
        [sys.executable, "-c", job], env=env, cwd="/", capture_output=True, text=True, check=True
    )
    note = job_run.stdout
    assert "Traceback in Slurm job 7:" in note
    assert f'File "{script}", line {line_of(script, "    calibrate(cfg)")}, in main' in note
    assert f'File "{script}", line {line_of(script, "raise ValueError")}, in calibrate' in note
    assert "<dynamic-code>" not in note
    assert note in job_run.stderr  # the job's log has it too


@pytest.mark.slow
def test_local_launcher_runs_the_sweep_on_this_machine(tmp_path):
    subprocess.run(app_command(tmp_path, "local", "seed=0,1,2"), check=True, capture_output=True)
    assert sorted(r["seed"] for r in records(tmp_path)) == [0, 1, 2]


# --- against the local Slurm cluster ---


def slurm_env() -> dict[str, str]:
    # Jobs inherit it (sbatch exports the environment): a run and its requeued attempt agree on the code
    # version of their checkpoints even if the checkout is edited between them.
    from latmix.version import code_version

    return {**os.environ, "SLURM_CONF": str(SLURM_CONF), "LATMIX_CODE_VERSION": f"tests-{code_version()}"}


@pytest.fixture(scope="module")
def slurm() -> Callable[..., subprocess.Popen]:
    """Launch the stand-in app through hydra/launcher=slurm; returns the Popen (stdout+stderr piped)."""
    if not SLURM_CONF.exists():
        pytest.fail(f"no local Slurm cluster ({SLURM_CONF} missing): run scripts/slurm/start_local_slurm.sh")
    ping = subprocess.run(["sinfo", "-h", "-o", "%t"], env=slurm_env(), capture_output=True, text=True)
    if ping.returncode != 0:
        pytest.fail(f"the local Slurm cluster does not answer ({ping.stderr.strip()}): start it again")

    def launch(tmp_path: Path, *overrides: str, app: Path = APP) -> subprocess.Popen:
        command = app_command(
            tmp_path,
            "slurm",
            f"hydra.launcher.submitit_folder={tmp_path / 'submitit' / '%j'}",
            *LOCAL_CLUSTER_OVERRIDES,
            *overrides,
            app=app,
        )
        return subprocess.Popen(
            command, env=slurm_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    return launch


def signal_job(name: str, signal: str = "USR2") -> None:
    """What Slurm does before a time limit (sbatch --signal), and what a preemption is forwarded as."""
    subprocess.run(["scancel", f"--signal={signal}", "--name", name], env=slurm_env(), check=True)


def finish(process: subprocess.Popen, timeout_s: float = 120) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, output


def checkpointed_blocks(tmp_path: Path) -> int:
    return len(list((tmp_path / "results" / "ckpt").glob("*/block_*.json")))


@pytest.mark.slurm
def test_a_sweep_of_three_runs_produces_three_records(slurm, tmp_path):
    returncode, output = finish(slurm(tmp_path, "seed=0,1,2", "blocks=2"))
    assert returncode == 0, output
    assert sorted(r["seed"] for r in records(tmp_path)) == [0, 1, 2]


@pytest.mark.slurm
def test_a_preempted_run_resumes_at_its_next_block_and_ends_with_the_uninterrupted_record(slurm, tmp_path):
    run = ("blocks=6", "seconds_per_block=1.5", f"hydra.launcher.timeout_min={PREEMPTIBLE_TIMEOUT_MIN}")
    name = f"preempt-{uuid.uuid4().hex[:8]}"
    preempted = slurm(tmp_path / "preempted", *run, f"hydra.launcher.name={name}")
    uninterrupted = slurm(tmp_path / "uninterrupted", *run)
    wait_for(
        lambda: checkpointed_blocks(tmp_path / "preempted") >= 2, "two calibrated blocks", launch=preempted
    )
    signal_job(name)
    returncode, output = finish(preempted)
    assert returncode == 0, output
    assert finish(uninterrupted)[0] == 0

    first_start, resumed_start = attempts(tmp_path / "preempted")
    assert first_start == 0
    assert resumed_start >= 2
    assert records(tmp_path / "preempted") == records(tmp_path / "uninterrupted")


@pytest.mark.slurm
def test_a_run_requeued_more_often_than_allowed_fails_with_a_clear_message(slurm, tmp_path):
    name = f"limit-{uuid.uuid4().hex[:8]}"
    run = slurm(
        tmp_path,
        "blocks=20",
        "seconds_per_block=1",
        f"hydra.launcher.name={name}",
        f"hydra.launcher.timeout_min={PREEMPTIBLE_TIMEOUT_MIN}",
        "hydra.launcher.max_num_timeout=0",
    )
    wait_for(lambda: checkpointed_blocks(tmp_path) >= 1, "a calibrated block", launch=run)
    signal_job(name)
    returncode, output = finish(run)
    assert returncode != 0
    assert "RequeueLimitError" in output
    assert "requeued 1 times" in output
    assert "hydra.launcher.max_num_timeout=0" in output
    assert not records(tmp_path)


@pytest.mark.slurm
def test_a_failing_run_reports_the_traceback_from_the_slurm_job(slurm, tmp_path):
    returncode, output = finish(slurm(tmp_path, "fail_at_block=1"))
    assert returncode != 0
    job_traceback = output[output.index("Traceback in Slurm job") :]
    # The job's frames, with the files and lines they ran from (not cloudpickle's "<dynamic-code>").
    assert f'File "{APP}", line {line_of(APP, "    run(cfg)")}, in main' in job_traceback
    assert f'File "{APP}", line {line_of(APP, "raise ValueError")}, in run' in job_traceback
    assert "<dynamic-code>" not in output
    assert job_traceback.rstrip().endswith("ValueError: injected failure in block 1")
    (job_log,) = (tmp_path / "submitit").glob("*/*_log.err")
    assert f'File "{APP}", line' in job_log.read_text()


@pytest.mark.slurm
def test_a_cancelled_job_is_reported_as_cancelled_not_awaited_forever(slurm, tmp_path):
    name = f"cancel-{uuid.uuid4().hex[:8]}"
    run = slurm(tmp_path, "blocks=100", "seconds_per_block=1", f"hydra.launcher.name={name}")
    wait_for(lambda: checkpointed_blocks(tmp_path) >= 1, "a calibrated block", launch=run)
    subprocess.run(["scancel", "--name", name], env=slurm_env(), check=True)
    returncode, output = finish(run, timeout_s=90)
    assert returncode != 0
    assert "CANCELLED" in output


# --- run.py itself ---


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama and a byte-level BPE tokenizer trained on the shipped calibration text.

    model=tiny loads it through model.name_or_path: the launcher path does not need the embedded
    model's trained weights, only a model that run.py loads, calibrates and evaluates in seconds.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train([str(REPO / "data" / "text" / "calibration.txt")], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_py_overrides(tmp_path: Path, model_dir: Path) -> tuple[str, ...]:
    """The cheapest run.py that still learns transforms, checkpointing after every step."""
    return (
        f"paths.output_dir={tmp_path / 'outputs'}",
        "model=tiny",
        f"model.name_or_path={model_dir}",
        "transform=affine_literal",
        "calib.n_samples=4",
        "calib.seq_len=64",
        "calib.batch_size=1",
        "calib.steps=4",
        "calib.checkpoint_every=1",
        "eval=quick",
        "eval.tasks=[]",
        "logger=none",
        f"hydra.launcher.timeout_min={PREEMPTIBLE_TIMEOUT_MIN}",
    )


def without_execution_facts(record: dict) -> dict:
    """The record minus what differs between two executions of one run: when, how long, where its
    files went, the commit checked out when it ended, and whether it resumed."""
    calibration = {
        k: v for k, v in record["calibration"].items() if k not in EXECUTION_CALIBRATION_KEYS
    }
    config = {k: v for k, v in record["config"].items() if k != "paths"}
    kept = {k: v for k, v in record.items() if k not in ("created", "timing", "git_sha")}
    return {**kept, "calibration": calibration, "config": config}


def calibration_checkpoints(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "results" / "ckpt").glob("*/calibration.pt"))


@pytest.mark.slurm
def test_run_py_preempted_mid_calibration_resumes_and_records_what_an_uninterrupted_run_records(
    slurm, tmp_path, tiny_llama_dir
):
    name = f"run-py-{uuid.uuid4().hex[:8]}"
    preempted = slurm(
        tmp_path / "preempted",
        *run_py_overrides(tmp_path / "preempted", tiny_llama_dir),
        f"hydra.launcher.name={name}",
        app=RUN_PY,
    )
    uninterrupted = slurm(
        tmp_path / "uninterrupted", *run_py_overrides(tmp_path / "uninterrupted", tiny_llama_dir), app=RUN_PY
    )
    wait_for(
        lambda: calibration_checkpoints(tmp_path / "preempted"),
        "a calibration checkpoint",
        timeout_s=300,
        launch=preempted,
    )
    signal_job(name)
    returncode, output = finish(preempted, timeout_s=600)
    assert returncode == 0, output
    returncode, output = finish(uninterrupted, timeout_s=600)
    assert returncode == 0, output

    (resumed,) = records(tmp_path / "preempted")
    (reference,) = records(tmp_path / "uninterrupted")
    assert resumed["calibration"]["resumed_from_step"] >= 1
    assert reference["calibration"]["resumed_from_step"] is None
    assert without_execution_facts(resumed) == without_execution_facts(reference)
