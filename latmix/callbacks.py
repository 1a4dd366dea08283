"""The Hydra callback that ends a -m sweep with one table of its runs (conf/hydra/callbacks/summary.yaml).

Each job leaves a small marker in its output directory (`latmix_job.json`: run id, results dir,
status), written where the job runs (this machine, or a Slurm node: `on_job_end` runs with the job);
`on_multirun_end`, on the submitting machine once every job has returned, reads the markers and the
records and prints `latmix.summary.sweep_summary`, also saved as `<sweep dir>/summary.txt`.
Statuses: ran, recorded (skipped: recorded earlier), failed (with the error), no record (the job
returned without one: the same run was in progress elsewhere), unfinished (no marker).

Hydra stops a sweep whose job raised before calling `on_multirun_end`; the markers stay, and the
same command run again skips what is recorded and ends with the table. Light to import (Hydra
instantiates callbacks for every run, also one that fails on a config error): pandas and the tables
load only when a sweep ends.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from latmix import record

log = logging.getLogger(__name__)

MARKER = "latmix_job.json"


def job_run_id(config: Any) -> str:
    """The run id experiment.run computes for a job's config (its task config: without `hydra`)."""
    from omegaconf import OmegaConf

    from latmix.config import identity_config

    task = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
    return record.run_id(identity_config(task))


def write_marker(output_dir: Path, run_id: str, results_dir: str, status: str, error: str | None) -> Path:
    path = Path(output_dir) / MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id, "results_dir": results_dir, "status": status, "error": error}))
    return path


def read_sweep(sweep_dir: str | Path) -> tuple[list, Path | None]:
    """The jobs of a sweep directory (one numbered subdirectory per job) as summary.Job, with records."""
    from latmix.summary import Job

    sweep_dir = Path(sweep_dir)
    jobs, results_dir = [], None
    subdirs = [d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()] if sweep_dir.is_dir() else []
    for job_dir in sorted(subdirs, key=lambda d: int(d.name)):
        marker = job_dir / MARKER
        if not marker.exists():
            jobs.append(Job(int(job_dir.name), None, "unfinished"))
            continue
        info = json.loads(marker.read_text())
        results_dir = Path(info["results_dir"])
        rec, error = None, info.get("error")
        path = record.record_path(results_dir, info["run_id"])
        if path.exists():
            try:
                rec = record.read_record(path)
            except record.RecordError as err:
                error = error or str(err)
        jobs.append(Job(int(job_dir.name), info["run_id"], info["status"], error, rec))
    return jobs, results_dir


class SweepSummary(Callback):
    """Each job leaves a marker; the sweep ends with one table of its jobs."""

    def __init__(self) -> None:
        self.started: float | None = None

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        self.started = time.time()

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        try:
            run_id = job_run_id(config)
            results_dir = str(Path(str(config.paths.results_dir)).expanduser().resolve())
            path = record.record_path(results_dir, run_id)
            error = None
            if job_return.status == JobStatus.FAILED:
                failure = job_return._return_value
                status, error = "failed", f"{type(failure).__name__}: {failure}"
            elif not path.exists():
                status = "no record"
            elif self.started is not None and path.stat().st_mtime < self.started - 1:
                status = "recorded"
            else:
                status = "ran"
            write_marker(Path(str(config.hydra.runtime.output_dir)), run_id, results_dir, status, error)
        except Exception as err:  # a summary never fails a job
            log.warning("no sweep marker for this job (%s: %s)", type(err).__name__, err)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from latmix.summary import fit, sweep_summary

        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            jobs, results_dir = read_sweep(sweep_dir)
            text = sweep_summary(jobs, results_dir) + "\n" + fit(f"  sweep directory: {sweep_dir} (this table: summary.txt)")
            (sweep_dir / "summary.txt").write_text(text + "\n")
            print(text, flush=True)
        except Exception as err:
            log.warning("no sweep summary (%s: %s)", type(err).__name__, err)
