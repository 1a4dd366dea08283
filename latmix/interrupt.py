"""Interruptions: SIGTERM, SIGINT and SIGUSR1 end a run cleanly, with a checkpoint and a distinct exit status.

    with interrupt.handling():              # experiment.run, around one run (main thread only)
        ...
        with interrupt.deferred("calibration"):
            for step in ...:                # the calibration loops
                ...
                checkpoints.after_step(...) # saves when due, when time is up, or when a signal is pending,
                                            # then interrupt.check(where): raises Interrupted if one is

Outside a `deferred` region a signal raises `Interrupted` at once (as Ctrl-C raises KeyboardInterrupt:
GPTQ and evaluation keep no state worth saving, and the last calibration checkpoint stays on disk).
Inside one (calibration) it is remembered and acted upon at the next safe point, after the current
optimizer step (end to end) or block (layer-wise): a checkpoint is written there first, so a rerun of
the same command resumes from it. A second signal while one is pending stops at once.

`Interrupted(signum, checkpoint, where)` is an Exception: the tracker marks the W&B run failed with
its message, the run lock is released, and run.py prints the message as one line and exits with
128 + the signal's number (SIGINT 130, SIGUSR1 138, SIGTERM 143), the status a shell reports for a
process the signal killed.

In a Slurm job submitit has its own handler for its preemption signal (SIGUSR2 unless
SUBMITIT_PREEMPT_SIGNAL says otherwise): it asks the launcher for a checkpoint, requeues the job and
exits. That handler is kept and chained: during calibration the signal is deferred to the next safe
point, a checkpoint is written, then submitit's handler runs (requeue and exit, as before); if no safe
point comes within `requeue_grace_s()` (half the launcher's signal_delay_s, at most 60 s) submitit's
handler runs anyway, so the job is still requeued before its time limit. Outside calibration it runs
at once. While it runs SIGTERM is ignored (inherited by `scontrol requeue`, which Slurm's requeue
would otherwise kill before it reports success). submitit only logs SIGTERM; here SIGTERM (scancel,
or Slurm's TERM before a kill) checkpoints and exits like anywhere else. `requeueing()` tells the
tracker that the SystemExit which follows is a requeue, not a failure.

Torch-free, latmix-free (a leaf): calibration calls `check` and `note_checkpoint`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = [
    "SIGNALS",
    "Interrupted",
    "check",
    "deferred",
    "handling",
    "note_checkpoint",
    "pending",
    "requeue_grace_s",
    "requeueing",
]

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # submitit's own variable (default USR2)
MAX_REQUEUE_GRACE_S = 60.0


class Interrupted(Exception):
    """The run stopped on a signal; `checkpoint` is the calibration checkpoint a rerun resumes from (or None)."""

    def __init__(self, signum: int, checkpoint: Path | None = None, where: str | None = None) -> None:
        self.signum = int(signum)
        self.signal = signal.Signals(signum).name
        self.checkpoint = checkpoint
        self.where = where
        super().__init__(self._message())

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    def _message(self) -> str:
        text = f"interrupted by {self.signal}"
        if self.where:
            text += f" at {self.where}"
        if self.checkpoint is not None:
            return f"{text}; calibration checkpoint: {self.checkpoint}; rerun the same command to resume from it"
        return f"{text}; no calibration checkpoint to resume from: rerun the same command to start over"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (a Slurm job sends its exception home)
        return (Interrupted, (self.signum, self.checkpoint, self.where))


@dataclass
class _State:
    installed: bool = False
    pid: int = 0  # the process that installed the handlers (forked children inherit them)
    previous: dict[int, Any] = field(default_factory=dict)
    chained: int | None = None  # submitit's preemption signal, when its handler is chained
    deferring: int = 0
    pending: int | None = None
    stopping: bool = False
    requeued: bool = False  # submitit's preemption handler was called (it requeues, then exits)
    last_checkpoint: Path | None = None
    timer: threading.Timer | None = None

    def reset(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.__init__()  # type: ignore[misc]


_state = _State()


def pending() -> int | None:
    """The signal waiting for the next safe point, or None."""
    return _state.pending


def requeueing() -> bool:
    """Whether submitit's preemption handler ran in this run: the SystemExit it raises (or its
    UncompletedJobError) is a Slurm time limit or preemption, not a failure of the run."""
    return _state.requeued


def note_checkpoint(path: Path) -> None:
    """The latest checkpoint of this run (what a rerun resumes from), named when it is interrupted."""
    _state.last_checkpoint = Path(path)


def requeue_grace_s() -> float:
    """How long a deferred Slurm preemption signal may wait for a safe point before submitit requeues."""
    delay = None
    with contextlib.suppress(Exception):
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            delay = HydraConfig.get().launcher.get("signal_delay_s")
    return MAX_REQUEUE_GRACE_S if not delay else min(MAX_REQUEUE_GRACE_S, float(delay) / 2)


def _chain_now(signum: int) -> None:
    """Run submitit's handler (checkpoint the launcher, requeue, exit) for its preemption signal."""
    state = _state
    if state.timer is not None:
        state.timer.cancel()
        state.timer = None
    state.pending = None
    previous = state.previous.get(signum)
    state.stopping = state.requeued = True
    # `scontrol requeue` makes Slurm SIGTERM every process of the job, `scontrol` itself included,
    # which then dies before it can report success (seen on the test cluster under load); an ignored
    # signal stays ignored across exec, so it survives. This process is about to exit anyway.
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    previous(signum, None)  # raises SystemExit after requeueing, or UncompletedJobError
    signal.signal(signal.SIGTERM, before)
    state.stopping = False  # it returned: a task of rank > 0, which neither requeues nor exits


def _defer_requeue(signum: int) -> None:
    state = _state
    state.pending = signum
    grace = requeue_grace_s()
    main = threading.main_thread().ident

    def fallback() -> None:
        if _state.pending == signum and main is not None:
            signal.pthread_kill(main, signum)  # the handler sees it pending: requeue now

    state.timer = threading.Timer(grace, fallback)
    state.timer.daemon = True
    state.timer.start()
    log.warning("caught %s (Slurm: time limit or preemption): checkpointing after the current step, "
                "then requeueing (within %.0f s)", signal.Signals(signum).name, grace)


def _as_before(signum: int, frame: FrameType | None) -> None:
    """In a forked child (a multiprocessing worker): what the signal did before handling() was entered."""
    previous = _state.previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signum, previous)
    if previous == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


def _handler(signum: int, frame: FrameType | None) -> None:
    state = _state
    if os.getpid() != state.pid:
        _as_before(signum, frame)
        return
    name = signal.Signals(signum).name
    if state.stopping:
        log.warning("caught %s while stopping; ignored", name)
        return
    if signum == state.chained:
        if state.deferring and state.pending != signum:
            _defer_requeue(signum)
        else:
            _chain_now(signum)
        return
    if state.deferring and state.pending is None:
        state.pending = signum
        log.warning("caught %s: stopping after the current step with a checkpoint (send it again to stop at once)",
                    name)
        return
    state.stopping = True
    raise Interrupted(signum, state.last_checkpoint, None)


def check(where: str) -> None:
    """A safe point: act on a pending signal (raise Interrupted, or requeue a Slurm job); else nothing."""
    state = _state
    signum = state.pending
    if signum is None:
        return
    if signum == state.chained:
        _chain_now(signum)
        return
    state.pending = None
    state.stopping = True
    raise Interrupted(signum, state.last_checkpoint, where)


@contextlib.contextmanager
def deferred(what: str = "calibration") -> Iterator[None]:
    """A region whose safe points call `check`: a signal waits for the next one (or for the region's end)."""
    _state.deferring += 1
    try:
        yield
    except BaseException:
        _state.deferring -= 1
        raise
    _state.deferring -= 1
    if not _state.deferring:
        check(f"the end of {what}")


def _preempt_signal() -> int | None:
    """submitit's preemption signal, if a Python handler (submitit's) is installed for it."""
    sig = getattr(signal, "SIG" + os.environ.get(PREEMPT_SIGNAL_ENV, "USR2"), None)
    if sig is None:
        return None
    current = signal.getsignal(sig)
    if callable(current) and current is not signal.default_int_handler:
        return int(sig)
    return None


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Install the handlers for one run (nested calls and non-main threads change nothing)."""
    if _state.installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.reset()
    _state.pid = os.getpid()
    _state.chained = chained = _preempt_signal()
    previous = _state.previous  # filled before each handler goes in: a signal may come at once
    try:
        for sig in {*SIGNALS, *([chained] if chained is not None else [])}:
            before = signal.getsignal(sig)  # None: installed outside Python
            previous[int(sig)] = signal.SIG_DFL if before is None else before
            signal.signal(sig, _handler)
        _state.installed = True
        yield
    finally:
        if _state.timer is not None:
            _state.timer.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _state.reset()
