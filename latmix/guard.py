"""One run's files kept consistent whatever happens to its process: the lock, the signals, the leftovers.

    with guarded_run(exp, rid) as guard:   # experiment.run, once the run is not already recorded
        guard.start()                      # force=true: discard the checkpoints; else: they must be readable
        ...                                # the pipeline (signals: latmix.interrupt)
        record.write_record(guard.record_path, rec)
        guard.finished()                   # the checkpoints go, unless calib.keep_checkpoints

`guarded_run`, in order:
1. probes `<results_dir>/runs/` by writing a file there (ConfigError naming paths.results_dir if it
   is a file, read-only, or not creatable), before any work;
2. takes the run's lock, `<results_dir>/runs/<run_id>.lock` (latmix.lock): a live holder elsewhere
   raises `RunInProgress` (run.py: one line, exit 75), or with wait=true is waited for; a stale one
   (its process is dead, its job requeued, its heartbeat old) is taken over;
3. installs the signal handlers (latmix.interrupt) for the rest of the run;
4. removes the temp files killed writers of this run left beside its record and its checkpoint
   (safe: only the lock holder writes them).

On the way out the handlers are restored and the lock released, whatever the exit.

Where things are: the record `<results_dir>/runs/<run_id>.json`, the lock beside it, the calibration
checkpoint `<results_dir>/ckpt/<run_id>/calibration.pt` (outside Hydra's output dir, which changes
on requeue). A Slurm job restarted by a requeue is not "forced" again: force=true discards the
checkpoints only on a job's first attempt, so a requeued forced run resumes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from latmix import interrupt, record
from latmix.calibrate.checkpoint import CHECKPOINT_FILE, discard, read_checkpoint
from latmix.files import check_writable_dir, remove_temp_files
from latmix.lock import RunInProgress, RunLock
from latmix.preemption import is_requeued
from latmix.settings import Experiment

__all__ = ["RunGuard", "RunInProgress", "guarded_run", "tidy_recorded"]

log = logging.getLogger(__name__)


class RunGuard:
    """The files of one run, held under its lock (see the module doc)."""

    def __init__(self, exp: Experiment, rid: str) -> None:
        self.rid = rid
        self.force = exp.force
        self.keep_checkpoints = bool(getattr(exp.calib, "keep_checkpoints", False))
        self.record_path = record.record_path(exp.results_dir, rid)
        self.ckpt_dir = record.checkpoint_dir(exp.results_dir, rid)
        self.lock = RunLock(
            record.lock_path(exp.results_dir, rid),
            wait=bool(getattr(exp, "wait", False)),
            label=f"run {rid}",
            hint=f"its record will be {self.record_path}; rerun with wait=true to wait for it",
        )

    @property
    def checkpoint(self) -> Path:
        return self.ckpt_dir / CHECKPOINT_FILE

    def clean_leftovers(self) -> None:
        for tmp in [*remove_temp_files(self.record_path), *remove_temp_files(self.checkpoint)]:
            log.info("removed %s, left by a run killed while writing", tmp)

    def start(self) -> None:
        """Before any work: force=true starts over (a requeued job excepted); else the checkpoint is readable."""
        if self.force and not is_requeued():
            if self.ckpt_dir.exists():
                log.info("force=true: discarding the calibration checkpoints in %s", self.ckpt_dir)
                discard(self.ckpt_dir)
        elif self.checkpoint.is_file():
            read_checkpoint(self.checkpoint)  # CheckpointCorrupt: one line naming the file, exit 2

    def finished(self) -> None:
        """The record is written: its checkpoints have served (kept with calib.keep_checkpoints=true)."""
        if self.keep_checkpoints or not self.ckpt_dir.exists():
            return
        discard(self.ckpt_dir)
        log.info("removed the calibration checkpoints in %s (calib.keep_checkpoints=true keeps them)", self.ckpt_dir)


@contextlib.contextmanager
def guarded_run(exp: Experiment, rid: str) -> Iterator[RunGuard]:
    """Probe the results dir, take the run's lock, handle signals, clean leftovers (see the module doc)."""
    check_writable_dir(exp.results_dir, "paths.results_dir")
    check_writable_dir(Path(exp.results_dir) / "runs", "paths.results_dir")
    guard = RunGuard(exp, rid)
    with guard.lock, interrupt.handling():
        guard.clean_leftovers()
        yield guard


def tidy_recorded(exp: Experiment, rid: str) -> None:
    """A recorded run that is skipped still removes what killed writers left beside its record and
    checkpoint, when no other process holds the run (else that process may be writing them now)."""
    guard = RunGuard(exp, rid)
    try:
        with guard.lock:
            guard.clean_leftovers()
    except RunInProgress:
        return
