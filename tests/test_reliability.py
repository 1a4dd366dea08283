"""Reliability: a run survives being killed anywhere, runs twice at once safely, stops cleanly on a signal,
and rejects every bad input with one line before any work.

The first part is fast (the lock, the signal handling, the checkpoint policy, the file checks, in
process). The second part (`slow`, run by `make test`) drives `python run.py` as a user would, on
model=tiny pointed at the random tiny checkpoint of conftest, with calibration and evaluation shrunk
so that a run takes seconds:

- SIGKILL at seeded random points (after a random delay from the start, or from a stage's log line),
  in chains (a run killed, its rerun killed, the next rerun completes): every completed rerun's
  record equals the uninterrupted run's (metrics, calibration, fidelity; not times or paths), and no
  temp file, lock or checkpoint is left;
- three identical runs at once: one computes, the others say where it runs (exit 75) or wait for it;
- SIGTERM, then SIGINT on the rerun: each writes a checkpoint at the next step and exits 143 / 130
  with one line; the W&B run is marked interrupted; the last rerun resumes and records what an
  uninterrupted run records;
- one test per bad-input class: exit 2, one line on stderr naming the key or file, and no stage of
  the pipeline ran.

Every subprocess runs with OMP_NUM_THREADS=1 (the same float reductions in every run, so records
compare exactly) and offline.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

from latmix import files, interrupt, lock, record, version
from latmix.calibrate.checkpoint import CHECKPOINT_FILE, CheckpointCorrupt, Checkpoints, fingerprint
from latmix.config import identity_config
from latmix.errors import ConfigError
from latmix.interrupt import Interrupted
from latmix.lock import RunInProgress, RunLock
from latmix.models import loading
from latmix.settings import CalibConfig, OptimConfig

ROOT = Path(__file__).resolve().parent.parent
RUN_PY = ROOT / "run.py"


# --- the lock ------------------------------------------------------------------------------------


def write_lock(path: Path, age_s: float = 0.0, **holder: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"token": "stale", "since": "earlier", **holder}))
    when = time.time() - age_s
    os.utime(path, (when, when))


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_held_lock_refuses_a_second_holder_saying_where_and_is_gone_once_released(tmp_path):
    path = tmp_path / "runs" / "abc.lock"
    with RunLock(path, label="run abc", hint="its record will be X"):
        holder = json.loads(path.read_text())
        assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(RunInProgress) as busy:
            RunLock(path, label="run abc", hint="its record will be X").acquire()
    message = str(busy.value)
    assert message.startswith(f"run abc is in progress on {socket.gethostname()} (pid {os.getpid()}, since ")
    assert message.endswith("; its record will be X") and "\n" not in message
    assert not path.exists() and list(path.parent.iterdir()) == []


@pytest.mark.parametrize(
    "stale",
    [
        pytest.param(lambda: {"host": socket.gethostname(), "pid": dead_pid()}, id="dead pid on this host"),
        pytest.param(
            lambda: {"host": socket.gethostname(), "pid": os.getpid(), "start": 1}, id="pid reused by another process"
        ),
        pytest.param(lambda: {"host": "node-b", "pid": 1, "age": lock.STALE_S + 60}, id="old heartbeat elsewhere"),
    ],
)
def test_a_stale_lock_is_taken_over(tmp_path, stale):
    holder = stale()
    path = tmp_path / "r.lock"
    write_lock(path, age_s=holder.pop("age", 0.0), **holder)
    taken = RunLock(path)
    taken.acquire()
    try:
        assert taken.took_over is not None and taken.took_over["token"] == "stale"
        assert json.loads(path.read_text())["token"] == taken.token
    finally:
        taken.release()


def test_a_zombie_holder_is_stale(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while lock._proc_stat(child.pid)[0] != "Z" and time.monotonic() < deadline:  # exited, not yet reaped
        time.sleep(0.05)
    write_lock(tmp_path / "r.lock", host=socket.gethostname(), pid=child.pid, start=lock.process_start(child.pid))
    with RunLock(tmp_path / "r.lock") as taken:
        assert taken.took_over is not None
    child.wait()


def test_a_live_holder_on_another_host_is_in_progress_and_its_own_requeued_job_is_not(tmp_path, monkeypatch):
    path = tmp_path / "r.lock"
    write_lock(path, age_s=5, host="node-b", pid=4242, slurm_job="77")
    with pytest.raises(RunInProgress, match=r"on node-b \(pid 4242, Slurm job 77, since earlier, heartbeat 5 s ago\)"):
        RunLock(path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, restarted by a requeue on another node
    with RunLock(path) as taken:
        assert taken.took_over["host"] == "node-b"


def test_wait_true_waits_for_the_holder_then_takes_the_lock(tmp_path):
    path = tmp_path / "r.lock"
    first = RunLock(path)
    first.acquire()
    threading.Timer(1.0, first.release).start()
    started = time.monotonic()
    with RunLock(path, wait=True) as second:
        assert second.waited and time.monotonic() - started >= 0.9
        assert json.loads(path.read_text())["token"] == second.token


def test_contenders_for_a_stale_lock_never_both_win(tmp_path):
    path = tmp_path / "r.lock"
    write_lock(path, host=socket.gethostname(), pid=dead_pid())
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def contend() -> None:
        candidate = RunLock(path)
        barrier.wait()
        try:
            candidate.acquire()
            outcomes.append("won")
        except RunInProgress:
            outcomes.append("busy")

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("won") == 1 and outcomes.count("busy") == 5


# --- signals -------------------------------------------------------------------------------------


def deliver(signum: int) -> None:
    """Send a signal to this process and give Python the chance to run its handler."""
    os.kill(os.getpid(), signum)
    for _ in range(100):
        time.sleep(0.01)


def test_a_signal_outside_calibration_stops_at_once_with_a_distinct_status():
    with pytest.raises(Interrupted) as stopped, interrupt.handling():
        deliver(signal.SIGTERM)
        pytest.fail("not interrupted")
    assert stopped.value.exit_status == 143 and stopped.value.signal == "SIGTERM"
    assert str(stopped.value) == (
        "interrupted by SIGTERM; no calibration checkpoint to resume from: rerun the same command to start over"
    )
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_during_calibration_a_signal_waits_for_the_step_and_writes_a_checkpoint(tmp_path, signum):
    checkpoints = Checkpoints(tmp_path, {"part": "x"})
    with pytest.raises(Interrupted) as stopped, interrupt.handling(), interrupt.deferred():
        checkpoints.after_step(1, 10, False, lambda: {"step": 1})
        assert not checkpoints.path.exists()  # nothing due, nothing pending
        deliver(signum)  # pending: the step goes on
        checkpoints.after_step(2, 10, False, lambda: {"step": 2})
    assert stopped.value.exit_status == 128 + signum
    assert stopped.value.checkpoint == checkpoints.path
    assert str(stopped.value) == (
        f"interrupted by {signal.Signals(signum).name} at calibration step 2 of 10; calibration checkpoint: "
        f"{checkpoints.path}; rerun the same command to resume from it"
    )
    assert torch.load(checkpoints.path, weights_only=True)["step"] == 2


def test_a_second_signal_while_one_is_pending_stops_at_once():
    with pytest.raises(Interrupted) as stopped, interrupt.handling(), interrupt.deferred():
        deliver(signal.SIGINT)
        deliver(signal.SIGINT)
        pytest.fail("not interrupted")
    assert stopped.value.where is None


def test_checkpoints_are_time_based_as_well_as_step_based(tmp_path):
    checkpoints = Checkpoints(tmp_path, {"part": "x"}, every_minutes=0.5 / 60)
    checkpoints.after_step(1, 10, False, lambda: {"step": 1})
    assert not checkpoints.path.exists()
    time.sleep(0.6)
    checkpoints.after_step(2, 10, False, lambda: {"step": 2})
    assert torch.load(checkpoints.path, weights_only=True)["step"] == 2
    checkpoints.after_step(3, 10, True, lambda: {"step": 3})  # due by the step schedule
    assert torch.load(checkpoints.path, weights_only=True)["step"] == 3


@pytest.fixture
def submitit_like_handler():
    """A stand-in for submitit's preemption handler (requeue, then exit), as a Slurm job has it."""
    calls: list[int] = []

    def requeue_and_exit(signum, frame):
        calls.append(signum)
        raise SystemExit(-1)

    before = signal.signal(signal.SIGUSR2, requeue_and_exit)
    yield calls
    signal.signal(signal.SIGUSR2, before)


def test_slurms_preemption_signal_checkpoints_first_then_runs_submitits_requeue(tmp_path, submitit_like_handler):
    checkpoints = Checkpoints(tmp_path, {"part": "x"})
    with pytest.raises(SystemExit), interrupt.handling(), interrupt.deferred():
        deliver(signal.SIGUSR2)
        assert submitit_like_handler == []  # deferred to the step's end
        checkpoints.after_step(4, 10, False, lambda: {"step": 4})
    assert submitit_like_handler == [signal.SIGUSR2]
    assert torch.load(checkpoints.path, weights_only=True)["step"] == 4
    with pytest.raises(SystemExit), interrupt.handling():  # outside calibration: at once
        deliver(signal.SIGUSR2)
    assert submitit_like_handler == [signal.SIGUSR2] * 2


def test_a_deferred_preemption_still_requeues_when_no_safe_point_comes(monkeypatch, submitit_like_handler):
    monkeypatch.setattr(interrupt, "MAX_REQUEUE_GRACE_S", 0.3)
    with pytest.raises(SystemExit), interrupt.handling(), interrupt.deferred():
        deliver(signal.SIGUSR2)
        time.sleep(3)  # a long step
        pytest.fail("not requeued")
    assert submitit_like_handler == [signal.SIGUSR2]  # once, by the fallback


def test_a_forked_worker_dies_of_the_signal_as_before():
    with interrupt.handling():
        pid = os.fork()
        if pid == 0:  # a multiprocessing worker, say
            time.sleep(30)
            os._exit(0)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


# --- checkpoints ---------------------------------------------------------------------------------


def test_a_corrupt_checkpoint_is_named_with_how_to_discard_it(tmp_path):
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointCorrupt) as corrupt:
        Checkpoints(tmp_path, {"part": "x"}).load()
    message = str(corrupt.value)
    assert isinstance(corrupt.value, ConfigError) and "\n" not in message
    assert message.startswith(f"calibration checkpoint {tmp_path / CHECKPOINT_FILE} is corrupt (")
    assert message.endswith(f"discard it and start over: rerun with force=true, or delete {tmp_path}")


def test_a_checkpoint_of_other_weights_or_code_is_not_resumed_and_says_why(tmp_path, caplog):
    parts = {"settings": "s", "data": "d", "model": "m", "code": "c"}
    Checkpoints(tmp_path, parts).save({"step": 3})
    assert Checkpoints(tmp_path, parts).load()["step"] == 3
    with caplog.at_level("WARNING"):
        assert Checkpoints(tmp_path, {**parts, "model": "m2", "code": "c2"}).load() is None
    assert "written with other model weights, other latmix code (version c, now c2): not resumed" in caplog.text


def test_the_fingerprint_covers_the_weights_and_the_code(tiny_checkpoint, tmp_path, monkeypatch):
    model_dir = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    model = type("Loaded", (), {"name_or_path": str(model_dir)})()
    ids = torch.zeros(2, 8, dtype=torch.long)
    before = fingerprint(CalibConfig(), OptimConfig(), ids, ["a"], model)
    assert fingerprint(CalibConfig(checkpoint_minutes=1, keep_checkpoints=True), OptimConfig(), ids, ["a"], model) == before
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one byte of the last tensor, same size
    weights.write_bytes(bytes(data))
    changed = fingerprint(CalibConfig(), OptimConfig(), ids, ["a"], model)
    assert changed["model"] != before["model"] and changed["settings"] == before["settings"]
    monkeypatch.setattr("latmix.calibrate.checkpoint.code_version", lambda: "other")
    assert fingerprint(CalibConfig(), OptimConfig(), ids, ["a"], model)["code"] != changed["code"]


# --- files ---------------------------------------------------------------------------------------

KILLED_MID_WRITE = """\
import os, signal, sys
from latmix.files import atomic_write

def write(f):
    f.write(b'{"run_id": ')
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write(sys.argv[1], write)
"""


def test_a_write_killed_midway_leaves_only_a_temp_file_which_is_removed(tmp_path):
    target = tmp_path / "runs" / "abc.json"
    done = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(target)], cwd=ROOT)
    assert done.returncode == -signal.SIGKILL
    assert not target.exists() and len(files.temp_files(target)) == 1
    assert files.remove_temp_files(target) and files.temp_files(target) == []


def test_the_results_dir_probe_rejects_a_file_and_an_unwritable_directory(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^paths.results_dir=.*/file is a file, not a directory; set paths"):
        files.check_writable_dir(tmp_path / "file", "paths.results_dir")

    def read_only(**_kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    with pytest.raises(ConfigError, match=r"is not writable \(Read-only file system\); set paths.results_dir to"):
        files.check_writable_dir(tmp_path / "d", "paths.results_dir")


# --- model files ---------------------------------------------------------------------------------


@pytest.fixture
def model_copy(tiny_checkpoint, tmp_path) -> Path:
    return shutil.copytree(tiny_checkpoint, tmp_path / "model")


def truncate(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def garble(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + min(64, header_len)] = b"#" * min(64, header_len)
    weights.write_bytes(bytes(data))


def poison(model_dir: Path, name: str = "model.layers.1.mlp.down_proj.weight") -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    tensors[name][3, 5] = float("nan")
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def set_config(model_dir: Path, **changes: Any) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


CUSTOM_CODE = {"model_type": "my_llama", "auto_map": {"AutoConfig": "configuration_my.MyConfig"}}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (truncate, r"model\.safetensors is truncated \(\d+ bytes; its header describes \d+\): the checkpoint is damaged"),
        (garble, r"model\.safetensors has a garbled header \(not JSON\): the checkpoint is damaged"),
        (lambda d: set_config(d, model_type="gpt2"),
         r"config\.json has model_type 'gpt2', which latmix has no adapter for; supported: llama, mistral, qwen2"),
        (lambda d: set_config(d, **CUSTOM_CODE),
         r"config\.json asks to run the model's own code \(auto_map\), which latmix runs only with "
         r"model\.trust_remote_code=true"),
    ],
    ids=["truncated", "garbled", "unknown model_type", "custom code"],
)
def test_a_broken_or_unsupported_checkpoint_is_one_line_before_its_weights_load(model_copy, damage, message):
    damage(model_copy)
    with pytest.raises(ConfigError, match=message) as failed:
        loading.load_config(str(model_copy))
    assert "\n" not in str(failed.value)


def test_the_supported_model_types_are_the_adapters():
    from latmix.models import ADAPTERS
    from latmix.settings import MODEL_TYPES

    assert set(MODEL_TYPES) == set(ADAPTERS)


def test_the_config_checks_a_local_models_files_without_torch(model_copy):
    truncate(model_copy)
    code = (
        "import sys\nfrom hydra import compose, initialize_config_dir\nfrom latmix import config\n"
        f"with initialize_config_dir(config_dir={str(ROOT / 'conf')!r}, version_base='1.3'):\n"
        f"    cfg = compose('config', overrides=['model=tiny', 'model.name_or_path={model_copy}'])\n"
        "try:\n    config.build_experiment(cfg)\nexcept config.ConfigError as err:\n    print(err)\n"
        "assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(rf"model file {re.escape(str(model_copy))}/model\.safetensors is truncated .*\n", done.stdout)


def test_a_non_finite_weight_is_named(model_copy):
    poison(model_copy)
    with pytest.raises(ConfigError, match=r"^model weights: model\.layers\.1\.mlp\.down_proj\.weight holds 1 non-finite"):
        loading.load_model(str(model_copy), "float32", "cpu")


def test_a_sequence_longer_than_the_models_positions_names_the_key(model_copy):
    config = loading.load_config(str(model_copy))
    loading.check_sequence_length(config, "calib.seq_len", 256)
    with pytest.raises(ConfigError, match=r"^calib\.seq_len=512 is longer than the model's 256 positions"):
        loading.check_sequence_length(config, "calib.seq_len", 512)


# ==================================================================================================
# End to end: python run.py as a user runs it
# ==================================================================================================


def env() -> dict[str, str]:
    # One code version for all the runs of a test, should the checkout be edited meanwhile.
    # PYTHONFAULTHANDLER: a run that hangs is sent SIGABRT (Run.finish), which prints every thread's stack.
    out = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline", "NETRC": "/nonexistent-netrc",
           "LATMIX_CODE_VERSION": f"tests-{version.code_version()}"}
    out.pop("WANDB_API_KEY", None)
    return out


def shrunk(model_dir: Path, results: Path, *, epochs: int = 3, checkpoint_every: int = 2) -> list[str]:
    """model=tiny on the random tiny checkpoint; every stage runs, in seconds."""
    return [
        "model=tiny", f"model.name_or_path={model_dir}", "transform=affine_literal", f"paths.results_dir={results}", "logger=none",
        "quant.weight_quantizer=gptq", "calib.n_samples=4", "calib.seq_len=64", "calib.batch_size=2",
        f"calib.epochs={epochs}", f"calib.checkpoint_every={checkpoint_every}",
        "eval=quick", "eval.max_seq_len=128", "eval.max_ppl_tokens=512", "eval.limit=4",
    ]


class Run:
    """`python run.py ...` in the background, its stdout and stderr collected line by line."""

    def __init__(self, overrides: list[str], out_dir: Path) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, str(RUN_PY), *overrides, f"hydra.run.dir={out_dir}"],
            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.started = time.monotonic()
        self._errors: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.lines), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, self._errors), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def wait_for(self, pattern: str | None, timeout: float = 120) -> bool:
        """Until a stdout line matches `pattern` (None: at once); False if the run ended first."""
        deadline = time.monotonic() + timeout
        while pattern is not None and not any(re.search(pattern, line) for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return self.process.poll() is None

    def finish(self, timeout: float = 300) -> int:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)  # faulthandler: where every thread is stuck
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
            self.process.kill()
            for reader in self._readers:
                reader.join(timeout=5)
            raise AssertionError(
                f"run.py did not end within {timeout} s; its threads' stacks:\n{self.stderr[-6000:]}"
            ) from None
        for reader in self._readers:
            reader.join(timeout=30)
        return self.process.returncode

    @property
    def stderr(self) -> str:
        return "".join(self._errors)

    @property
    def stdout(self) -> str:
        return "".join(self.lines)


def run_cli(overrides: list[str], out_dir: Path, timeout: float = 300) -> Run:
    run = Run(overrides, out_dir)
    run.finish(timeout)
    return run


def comparable(rec: dict) -> dict:
    """What two executions of one run must agree on: the metrics, the calibration and fidelity numbers,
    the config (what it computes: record.identity), the run id; not when, how long, or whether it resumed."""
    calibration = {k: v for k, v in rec["calibration"].items() if k not in record.EXECUTION_CALIBRATION_KEYS}
    return {"run_id": rec["run_id"], "metrics": rec["metrics"], "calibration": calibration,
            "fidelity": rec.get("fidelity"), "config": record.identity(rec["config"]), "seed": rec["seed"]}


def the_record(results: Path) -> dict:
    (path,) = (results / "runs").glob("*.json")
    return record.read_record(path)


def leftovers(results: Path) -> list[str]:
    """Partial files: temp files, locks, break files anywhere; any checkpoint once a run is recorded."""
    found = [p for p in results.rglob("*") if p.is_file() and (p.suffix in (".tmp", ".lock", ".break"))]
    found += [p for p in (results / "ckpt").rglob("*") if p.is_file()] if (results / "ckpt").exists() else []
    return sorted(str(p.relative_to(results)) for p in found)


def error_line(run: Run) -> str:
    """The one line run.py printed on stderr for a run that stopped (asserting there is one, last)."""
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    flagged = [line for line in lines if line.startswith(("error:", "interrupted by"))]
    assert len(flagged) == 1 and lines[-1] == flagged[0], run.stderr[-3000:]
    return flagged[0]


# --- SIGKILL anywhere ------------------------------------------------------------------------------

KILL_SEED = 20261130
KILLS = 10
START_S = 12.0
# A kill point: after a stage's log line (None: the start: imports, Hydra), a random delay.
TRIGGERS = [None, r"stage load ", r"stage transform ", r"calibration resumes|stage transform ",
            r"stage calibrate ", r"stage quantize ", r"stage evaluate "]


def kill_chain(model_dir: Path, results: Path, out: Path, points: list[tuple[str | None, float]]) -> dict[str, Any]:
    """Kill the run at each point in turn (each a rerun of the last), then rerun to completion."""
    killed = []
    for n, (trigger, delay) in enumerate(points):
        run = Run(shrunk(model_dir, results), out / f"attempt{n}")
        alive = run.wait_for(trigger) and (time.sleep(delay) or run.process.poll() is None)
        if alive:
            run.process.kill()
            killed.append((trigger, round(delay, 2), round(time.monotonic() - run.started, 1)))
        run.finish()
    # A killed record write leaves a temp file beside the record; plant one as it would be left.
    (results / "runs").mkdir(parents=True, exist_ok=True)
    (results / "runs" / f".{record_id(model_dir, results)}.json.k1ll3d.tmp").write_bytes(b"")
    final = run_cli(shrunk(model_dir, results), out / "final")
    return {"killed": killed, "final": final}


def record_id(model_dir: Path, results: Path) -> str:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=shrunk(model_dir, results))
    return record.run_id(identity_config(cfg))


@pytest.mark.slow
def test_sigkill_at_random_points_never_loses_or_corrupts_a_record(tiny_checkpoint, tmp_path):
    rng = random.Random(KILL_SEED)
    # From the start: up to START_S s (imports, Hydra, and on an idle machine the whole pipeline);
    # after a stage's log line: up to 1.5 s (that stage's work and the next's).
    chains = [
        [(trigger, rng.uniform(0, START_S if trigger is None else 1.5)) for trigger in rng.sample(TRIGGERS, 2)]
        for _ in range(KILLS // 2)
    ]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        reference = pool.submit(run_cli, shrunk(tiny_checkpoint, tmp_path / "reference"), tmp_path / "out-reference")
        outcomes = list(pool.map(
            lambda ic: kill_chain(tiny_checkpoint, tmp_path / f"chain{ic[0]}", tmp_path / f"out{ic[0]}", ic[1]),
            enumerate(chains),
        ))
    assert reference.result().process.returncode == 0, reference.result().stderr[-3000:]
    expected = comparable(the_record(tmp_path / "reference"))
    killed = [k for outcome in outcomes for k in outcome["killed"]]
    print(f"\nSIGKILL: {len(killed)} kills at (trigger, delay s, s after start): {killed}")
    assert len(killed) >= KILLS - 2, killed  # a point past the end of a (resumed) run kills nothing
    for n, outcome in enumerate(outcomes):
        final = outcome["final"]
        assert final.process.returncode == 0, final.stderr[-3000:]
        assert comparable(the_record(tmp_path / f"chain{n}")) == expected
        assert leftovers(tmp_path / f"chain{n}") == []


# --- two at once ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_identical_runs_at_once_give_one_record_and_say_where_it_runs(tiny_checkpoint, tmp_path):
    results = tmp_path / "results"
    common = shrunk(tiny_checkpoint, results, epochs=8, checkpoint_every=50)
    runs = [Run(common, tmp_path / "a"), Run(common, tmp_path / "b"), Run([*common, "wait=true"], tmp_path / "c")]
    codes = [run.finish() for run in runs]
    computed = [run for run in runs if "stage calibrate" in run.stdout]
    assert len(computed) == 1 and computed[0].process.returncode == 0, [r.stderr[-2000:] for r in runs]
    rid = the_record(results)["run_id"]
    for run, code in zip(runs, codes, strict=True):
        if run is computed[0]:
            continue
        if code == 75:
            line = error_line(run)
            assert re.fullmatch(
                rf"error: run {rid} is in progress on {re.escape(socket.gethostname())} \(pid "
                rf"{computed[0].process.pid}, since [^)]+\); its record will be {re.escape(str(results))}/runs/"
                rf"{rid}\.json; rerun with wait=true to wait for it", line,
            ), line
        else:  # waited (wait=true), or started after the record was written
            assert code == 0, run.stderr[-2000:]
            assert re.search(r"recorded at .* by another process|already recorded", run.stdout)
    assert 75 in codes or "waiting: run" in runs[2].stdout  # the lock was met, not just luck of timing
    assert leftovers(results) == []


# --- SIGTERM / SIGINT ----------------------------------------------------------------------------


STEPS = 400  # calibration steps of the signalled run (2 batches per epoch)


@pytest.mark.slow
def test_sigterm_then_sigint_checkpoint_and_exit_with_their_status_and_the_rerun_resumes(tiny_checkpoint, tmp_path):
    def overrides(results: Path) -> list[str]:
        # No step-based checkpoint: the one a rerun resumes from is written because of the signal. Enough
        # steps (STEPS, a few seconds on a CPU) that the signal lands mid-calibration.
        return [*shrunk(tiny_checkpoint, results, epochs=STEPS // 2, checkpoint_every=10 * STEPS), "logger=wandb"]

    reference = Run(overrides(tmp_path / "reference"), tmp_path / "out-reference")
    results = tmp_path / "results"
    steps = []
    for n, (signum, trigger) in enumerate([(signal.SIGTERM, r"stage transform "),
                                           (signal.SIGINT, r"calibration resumes from step")]):
        run = Run(overrides(results), tmp_path / f"out{n}")
        assert run.wait_for(trigger), run.stdout[-3000:]
        time.sleep(0.7)
        run.process.send_signal(signum)
        assert run.finish() == 128 + signum, run.stderr[-3000:]
        name = signal.Signals(signum).name
        ckpt = results / "ckpt" / the_run_id(results) / CHECKPOINT_FILE
        match = re.fullmatch(
            rf"interrupted by {name} at calibration step (\d+) of {STEPS}; calibration checkpoint: {re.escape(str(ckpt))}; "
            "rerun the same command to resume from it", error_line(run),
        )
        assert match, error_line(run)
        steps.append(int(match.group(1)))
        assert torch.load(ckpt, weights_only=True)["step"] == steps[-1]
        assert list((results / "runs").iterdir()) == []  # no record, no lock, no temp file
        wandb_summary = offline_wandb_summary(results, n)  # the W&B run is marked interrupted, with the signal
        assert (wandb_summary.get("status"), wandb_summary.get("signal")) == ("interrupted", name), wandb_summary
    assert steps[0] < steps[1] < STEPS

    final = run_cli(overrides(results), tmp_path / "out-final")
    assert final.process.returncode == 0, final.stderr[-3000:]
    assert f"calibration resumes from step {steps[1]}" in final.stdout
    assert reference.finish() == 0, reference.stderr[-3000:]
    resumed = the_record(results)
    assert resumed["calibration"]["resumed_from_step"] == steps[1]
    assert comparable(resumed) == comparable(the_record(tmp_path / "reference"))
    assert leftovers(results) == [] and not (results / "ckpt").exists()


def the_run_id(results: Path) -> str:
    (ckpt,) = (results / "ckpt").iterdir()
    return ckpt.name


def offline_wandb_summary(results: Path, n: int) -> dict:
    from wandb_offline import read_offline_run

    runs = sorted((results / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == n + 1, runs
    return read_offline_run(runs[n])["summary"]


# --- force=true, resume, keep (in process: no imports to pay) -------------------------------------


@pytest.mark.slow
def test_force_starts_calibration_over_and_checkpoints_go_once_recorded_unless_kept(tiny_checkpoint, tmp_path, caplog):
    from latmix.experiment import run

    results = tmp_path / "results"
    overrides = shrunk(tiny_checkpoint, results, epochs=2, checkpoint_every=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # oversubscribed threads crawl on a busy 2-core machine
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        kept = run(compose("config", overrides=[*overrides, "calib.keep_checkpoints=true"]))
        ckpt = results / "ckpt" / kept["run_id"] / CHECKPOINT_FILE
        assert ckpt.is_file()  # kept: keep_checkpoints is not part of the run id, so the same run
        with caplog.at_level("INFO"):
            forced = run(compose("config", overrides=[*overrides, "force=true"]))
    torch.set_num_threads(threads)
    assert forced["run_id"] == kept["run_id"]
    assert forced["calibration"]["resumed_from_step"] is None  # recomputed, not resumed from step 4
    assert "force=true: discarding the calibration checkpoints" in caplog.text
    assert "calibration resumes" not in caplog.text
    assert comparable(forced) == comparable(kept)
    assert not ckpt.exists() and leftovers(results) == []


# --- bad input: one line, exit 2, nothing heavy ----------------------------------------------------


def read_only_dir(path: Path) -> Callable[[], None]:
    """A directory this process cannot write in, even as root (immutable); returns the undo."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root where chattr +i is not allowed: no read-only directory to test with")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def bad_cases(tmp: Path, model_dir: Path) -> dict[str, tuple[list[str], str]]:
    """class -> (overrides replacing the defaults of shrunk(), the one line's pattern)."""

    def damaged(name: str, damage: Callable[[Path], None]) -> Path:
        copy = shutil.copytree(model_dir, tmp / name)
        damage(copy)
        return copy

    corrupt_results = tmp / "corrupt-ckpt"
    rid = record_id(model_dir, corrupt_results)
    (corrupt_results / "ckpt" / rid).mkdir(parents=True)
    (corrupt_results / "ckpt" / rid / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 not a checkpoint")
    (tmp / "results-file").write_text("")
    model = re.escape(str(tmp))
    return {
        "truncated safetensors": ([f"model.name_or_path={damaged('truncated', truncate)}"],
                                  rf"model file {model}/truncated/model\.safetensors is truncated"),
        "garbled safetensors": ([f"model.name_or_path={damaged('garbled', garble)}"],
                                rf"model file {model}/garbled/model\.safetensors has a garbled header"),
        "non-finite weight": ([f"model.name_or_path={damaged('nan', poison)}"],
                              r"model weights: model\.layers\.1\.mlp\.down_proj\.weight holds 1 non-finite"),
        "seed out of range": (["seed=-1"], r"seed=-1 is not a seed; use an integer from 0 to 4294967295"),
        "device without it": ([f"device=cuda:{torch.cuda.device_count()}"], r"device=cuda:\d+ is not available here"),
        "unknown top-level key": (["+foo=1"], r"unknown top-level key\(s\) foo: nothing reads them"),
        "sequence past positions": (["calib.seq_len=512"],
                                    r"calib\.seq_len=512 is longer than the model's 256 positions"),
        "eval.limit < 1": (["eval.limit=0"], r"eval: eval\.limit must be an integer >= 1 or null \(all\), got 0"),
        "results dir is a file": ([f"paths.results_dir={tmp / 'results-file'}"],
                                  r"paths\.results_dir=.*results-file is a file, not a directory"),
        "results dir read-only": ([f"paths.results_dir={tmp / 'read-only'}"],
                                  r"paths\.results_dir=.*read-only is not writable \("),
        "corrupt checkpoint": ([f"paths.results_dir={corrupt_results}"],
                               rf"calibration checkpoint {re.escape(str(corrupt_results))}/ckpt/{rid}/calibration\.pt is "
                               r"corrupt \(.*\); discard it and start over: rerun with force=true, or delete"),
        "unknown model_type": ([f"model.name_or_path={damaged('gpt2', lambda d: set_config(d, model_type='gpt2'))}"],
                               rf"the model config {model}/gpt2/config\.json has model_type 'gpt2', which latmix has "
                               r"no adapter for; supported: llama, mistral, qwen2"),
        "custom code": ([f"model.name_or_path={damaged('custom', lambda d: set_config(d, **CUSTOM_CODE))}"],
                        r"asks to run the model's own code \(auto_map\), which latmix runs only with "
                        r"model\.trust_remote_code=true"),
        "calibration text missing": (["calib.source=local", f"calib.path={tmp / 'no-such.txt'}"],
                                     r"calib\.path=.*no-such\.txt: no such file"),
        "model path missing": ([f"model.name_or_path={tmp / 'no-such-model'}"],
                               r"model\.name_or_path=.*no-such-model: no such directory"),
        "hub id offline": (["model.name_or_path=meta-llama/Meta-Llama-3-8B"],
                           r"model\.name_or_path='meta-llama/Meta-Llama-3-8B' is not a local directory and could not "
                           r"be fetched .* \(hf download meta-llama/Meta-Llama-3-8B --local-dir DIR\)"),
    }


BAD_CLASSES = [
    "truncated safetensors", "garbled safetensors", "non-finite weight", "seed out of range", "device without it",
    "unknown top-level key", "sequence past positions", "eval.limit < 1", "results dir is a file",
    "results dir read-only", "corrupt checkpoint", "unknown model_type", "custom code", "calibration text missing",
    "model path missing", "hub id offline",
]


@pytest.fixture(scope="module")
def bad_runs(tiny_checkpoint, tmp_path_factory) -> dict[str, tuple[Run, str]]:
    """Every bad-input class run through run.py, three at a time."""
    tmp = tmp_path_factory.mktemp("bad")
    undo = read_only_dir(tmp / "read-only")
    cases = bad_cases(tmp, tiny_checkpoint)
    assert sorted(cases) == sorted(BAD_CLASSES)

    def launch(name: str) -> tuple[Run, str]:
        extra, pattern = cases[name]
        slug = re.sub(r"[^\w-]", "-", name)
        overrides = [*shrunk(tiny_checkpoint, tmp / "results" / slug), *extra]
        return run_cli(overrides, tmp / "out" / slug, timeout=300), pattern

    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            yield dict(zip(BAD_CLASSES, pool.map(launch, BAD_CLASSES), strict=True))
    finally:
        undo()


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_CLASSES)
def test_bad_input_is_one_line_exit_2_before_any_stage(bad_runs, case):
    run, pattern = bad_runs[case]
    assert run.process.returncode == 2, (run.stdout[-2000:], run.stderr[-3000:])
    line = error_line(run)
    assert re.search(pattern, line), line
    assert not re.search(r"stage \w+ +[\d.]+ s", run.stdout + run.stderr), run.stdout[-2000:]
    assert "calibrate end_to_end" not in run.stderr  # no calibration step either


def test_a_skipped_recorded_run_removes_what_killed_writers_left_unless_the_run_is_held(tmp_path):
    from latmix.config import build_experiment
    from latmix.guard import tidy_recorded
    from latmix.record import lock_path

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        exp = build_experiment(compose("config", overrides=["model=tiny", f"paths.results_dir={tmp_path}"]))
    runs = tmp_path / "runs"
    runs.mkdir()
    left = runs / ".abc.json.k1ll3d.tmp"
    left.write_bytes(b"")
    with lock.RunLock(lock_path(tmp_path, "abc")):  # a live process holds the run: it may be writing that file
        tidy_recorded(exp, "abc")
        assert left.exists()
    tidy_recorded(exp, "abc")
    assert list(runs.iterdir()) == []
