"""Requeue glue for runs launched with hydra/launcher=slurm: resume, a bounded number of times, loudly.

hydra-submitit-launcher already makes a signalled job requeue itself: when Slurm signals the time
limit (or a preemption forwarded as submitit's signal), submitit calls the launcher's `checkpoint`,
requeues the job, and the new attempt runs the task function again from the top. The task resumes
from state kept outside Hydra's output dir (latmix: the calibration checkpoints under
<results_dir>/ckpt/<run_id>/). `slurm_task` adds, around that task function:

- a limit: submitit counts only timeouts (`max_num_timeout`), so a job preempted again and again, or
  requeued by Slurm itself (PreemptMode=REQUEUE), would restart forever. Slurm counts every restart
  in SLURM_RESTART_COUNT; past `hydra.launcher.max_num_timeout` restarts the task refuses to start
  with `RequeueLimitError`, saying what to change.
- the remote traceback: Hydra pickles a failed job's exception back to the submitting process, which
  loses where it was raised; the job's traceback travels with it as an exception note.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import TaskFunction
from omegaconf import DictConfig


class RequeueLimitError(RuntimeError):
    """A Slurm job was requeued (time limit or preemption) more often than allowed."""


def requeue_limit() -> int | None:
    """hydra.launcher.max_num_timeout, or None when the launcher has no such limit (local runs)."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().launcher.get("max_num_timeout")


def check_requeue_limit(restarts: int, limit: int | None) -> None:
    """Raise RequeueLimitError if a job restarted `restarts` times exceeds `limit` (None: no limit)."""
    if limit is not None and restarts > limit:
        raise RequeueLimitError(
            f"this Slurm job has been requeued {restarts} times (time limit or preemption) and "
            f"hydra.launcher.max_num_timeout={limit}. Its checkpoints are kept: raise "
            f"hydra.launcher.timeout_min or hydra.launcher.max_num_timeout and relaunch the same "
            f"command to resume where it stopped."
        )


def slurm_job_id() -> str:
    """This job's id as squeue and sacct show it: <array job>_<task> for a sweep's task."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def slurm_task(task_function: TaskFunction) -> TaskFunction:
    """Decorate a Hydra task function (under @hydra.main) with the requeue limit and remote traceback.

    Outside a Slurm job it changes nothing.
    """

    @functools.wraps(task_function)
    def guarded(cfg: DictConfig) -> Any:
        if "SLURM_JOB_ID" not in os.environ:
            return task_function(cfg)
        check_requeue_limit(int(os.environ.get("SLURM_RESTART_COUNT", "0")), requeue_limit())
        try:
            return task_function(cfg)
        except Exception as err:
            note = f"Traceback in Slurm job {slurm_job_id()}:\n" + traceback.format_exc().rstrip()
            if sys.version_info >= (3, 11):
                err.add_note(note)
            else:  # no exception notes before 3.11: the traceback stays in the job's stderr log
                print(note, file=sys.stderr)
            raise

    return guarded
