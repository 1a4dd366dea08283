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
  loses where it was raised; the job's traceback travels with it as an exception note (and goes to
  the job's stderr log).
- real file names in that traceback: the launcher sends the task function to the job with
  cloudpickle, which pickles a function of the script being run (`__main__`: run.py) by value, and
  since cloudpickle 3.1.2 renames the code of such functions `<dynamic-code>`. The wrapped task
  therefore pickles as "the task function of the script at this path", and the job imports that
  script from its file, like any module (see `SlurmTask.__reduce_ex__`).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import sys
import traceback
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import TaskFunction
from omegaconf import DictConfig

# The name under which a Slurm job imports the script whose task function it runs: not "__main__",
# so that the script's `if __name__ == "__main__":` block does not run again.
SCRIPT_MODULE = "__slurm_task_script__"
_loaded_scripts: dict[str, Any] = {}


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


def is_requeued() -> bool:
    """Whether this process is a restarted attempt of a Slurm job (requeued after a time limit or a
    preemption): it continues the run it was given, so force=true must not discard its checkpoints."""
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def slurm_job_id() -> str:
    """This job's id as squeue and sacct show it: <array job>_<task> for a sweep's task."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def _script_of(task_function: TaskFunction) -> str | None:
    """The file of the script that defines `task_function`, if a job could not import it by name."""
    if task_function.__module__ not in ("__main__", SCRIPT_MODULE):
        return None
    path = getattr(sys.modules.get(task_function.__module__), "__file__", None)
    return os.path.abspath(path) if path else None


class SlurmTask:
    """A Hydra task function with the requeue limit and the remote traceback (see `slurm_task`)."""

    def __init__(self, task_function: TaskFunction):
        functools.update_wrapper(self, task_function)
        self._script = _script_of(task_function)

    def __call__(self, cfg: DictConfig) -> Any:
        task_function = self.__wrapped__
        if "SLURM_JOB_ID" not in os.environ:
            return task_function(cfg)
        check_requeue_limit(int(os.environ.get("SLURM_RESTART_COUNT", "0")), requeue_limit())
        try:
            return task_function(cfg)
        except Exception as err:
            frames = err.__traceback__.tb_next if err.__traceback__ else None  # from the task down
            note = (
                f"Traceback in Slurm job {slurm_job_id()}:\n"
                + "".join(traceback.format_exception(type(err), err, frames)).rstrip()
            )
            print(note, file=sys.stderr)  # the job's *_log.err
            if sys.version_info >= (3, 11):  # no exception notes before 3.11: only the log has it
                err.add_note(note)
            raise

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickle a script's task as (script path, name), so that the job imports the script's file.

        Pickled by value instead (cloudpickle's way for `__main__`), its code would run in the job as
        `<dynamic-code>`, without file names in tracebacks. A task function of an importable module
        pickles as usual (by reference).
        """
        if self._script is None:
            return super().__reduce_ex__(protocol)
        return _task_of_script, (self._script, self.__wrapped__.__qualname__)


def _task_of_script(script: str, qualname: str) -> SlurmTask:
    """In a job: import `script` from its file (once per process) and return its SlurmTask `qualname`."""
    module = _loaded_scripts.get(script)
    if module is None:
        spec = importlib.util.spec_from_file_location(SCRIPT_MODULE, script)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import the Slurm task's script {script}")
        module = importlib.util.module_from_spec(spec)
        # As `python script.py` would: the script's own folder first on the path, for its imports.
        script_dir = os.path.dirname(script)
        if script_dir not in sys.path:
            sys.path.insert(0, script_dir)
        sys.modules[SCRIPT_MODULE] = module
        spec.loader.exec_module(module)
        _loaded_scripts[script] = module
    found: Any = module
    for name in qualname.split("."):
        found = getattr(found, name, None)
    task = inspect.unwrap(found, stop=lambda f: isinstance(f, SlurmTask)) if found is not None else None
    if not isinstance(task, SlurmTask):
        raise ImportError(f"{script} has no task function {qualname!r} decorated with slurm_task")
    return task


def slurm_task(task_function: TaskFunction) -> TaskFunction:
    """Decorate a Hydra task function (under @hydra.main) with the requeue limit and remote traceback.

    Outside a Slurm job it changes nothing.
    """
    return SlurmTask(task_function)
