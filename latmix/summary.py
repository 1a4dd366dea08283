"""What a run and a sweep end with in the log: their results as a table, readable in 110 columns.

`run_summary(rec, results_dir)`: one run's perplexities, task accuracies and averages beside the
full-precision record of the same model and evaluation (quant none, identity transform, the same
`model.*` and `eval.*` config, `tables.configuration`) with the deltas, when one is recorded; its
stage times; where its record is.

`sweep_summary(jobs)`: one row per job of a `-m` sweep, already-recorded (skipped) and failed jobs
included; latmix.callbacks.SweepSummary (a Hydra callback) prints it when a sweep ends.

Torch-free: pandas through latmix.tables only.
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from latmix import record, tables

log = logging.getLogger(__name__)

WIDTH = 110
STAGE_ORDER = ("load", "transform", "calibrate", "quantize", "evaluate", "export", "total")
ACCURACY_NOTE = "accuracy in %, acc_norm where the task has it"


# --- the full-precision reference ----------------------------------------------------------------


def evaluation_setting(rec: Mapping[str, Any]) -> dict[str, str]:
    """The model.* and eval.* keys of a record's configuration: what a full-precision reference shares."""
    return {k: v for k, v in tables.configuration(rec).items() if k.startswith(tables.SETTING_PREFIXES)}


def is_fp_reference(rec: Mapping[str, Any]) -> bool:
    return tables.is_full_precision(rec) and rec["transform"] == "identity"


def fp_references(rec: Mapping[str, Any], results_dir: str | Path) -> list[dict]:
    """Full-precision records of the same model and evaluation setting (not `rec` itself)."""
    setting = evaluation_setting(rec)
    found = []
    for item in record.iter_records(results_dir):
        if isinstance(item, record.SkippedRecord) or item["run_id"] == rec["run_id"]:
            continue
        if is_fp_reference(item) and evaluation_setting(item) == setting:
            found.append(item)
    return found


def metric_values(rec: Mapping[str, Any]) -> dict[str, float]:
    """'ppl_<dataset>', '<task>' (headline accuracy in %), 'avg6', 'avg8', 'avg' (%): tables' row values."""
    row = tables.record_row(dict(rec))
    names = [c for c in row if c.startswith("ppl_")] + sorted(rec["metrics"]["tasks"]) + tables.AVERAGE_COLUMNS
    return {name: row[name] for name in names if _is_number(row.get(name))}


def mean_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for rec in records:
        for name, value in metric_values(rec).items():
            values.setdefault(name, []).append(value)
    return {name: sum(v) / len(v) for name, v in values.items()}


def display_name(metric: str) -> str:
    if metric in tables.DISPLAY_NAMES:
        return tables.DISPLAY_NAMES[metric]
    return f"{metric.removeprefix('ppl_')} ppl" if metric.startswith("ppl_") else metric


# --- rendering -----------------------------------------------------------------------------------


def render(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool], indent: str = "  ") -> list[str]:
    """Plain aligned text columns: header, a rule, the rows."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return (indent + "  ".join(parts)).rstrip()

    return [line(header), indent + "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _number(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or not _is_number(value) else f"{value:.{digits}f}"


def _delta(value: float | None, reference: float | None) -> str:
    if not _is_number(value) or not _is_number(reference):
        return ""
    return f"{value - reference:+.2f}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def stage_times(timing: Mapping[str, Any]) -> str:
    stages = sorted(timing, key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s))
    return " · ".join(f"{stage} {timing[stage]:.1f}" for stage in stages if _is_number(timing[stage]))


def method_of(rec: Mapping[str, Any]) -> str:
    quantized = rec["config"].get("quant", {}).get("weight_format") is not None
    return tables.method_label(rec["transform"], rec["weight_quantizer"], quantized)


def run_summary(rec: Mapping[str, Any], results_dir: str | Path, *, recorded_earlier: bool = False) -> str:
    """The run-end table: metrics, the full-precision reference and deltas, stage times, the record."""
    title = (f"run {rec['run_id']} · {rec['model']} · {rec['quant']} · {method_of(rec)} · seed {rec['seed']}"
             + (" · recorded earlier" if recorded_earlier else ""))
    values = metric_values(rec)
    references = [] if is_fp_reference(rec) else fp_references(rec, results_dir)
    reference = mean_metrics(references) if references else {}
    header = ["metric", "value"] + (["full precision", "Δ"] if references else [])
    rows = []
    for name, value in values.items():
        row = [display_name(name), _number(value)]
        if references:
            row += [_number(reference.get(name)), _delta(value, reference.get(name))]
        rows.append(row)
    lines = [title]
    lines += render(header, rows, [False, True, True, True][: len(header)]) if rows else ["  no metrics recorded"]
    if any(not name.startswith("ppl_") for name in values):
        lines.append(f"  ({ACCURACY_NOTE})")
    if is_fp_reference(rec):
        lines.append("  this run is the full-precision reference of its model and evaluation")
    elif references:
        ids = ", ".join(r["run_id"] for r in references[:3]) + (", ..." if len(references) > 3 else "")
        lines.append(f"  full precision: mean of {len(references)} record(s) ({ids})")
    else:
        lines.append("  no full-precision record of this model and evaluation for deltas (quant=none "
                     "transform=identity makes one)")
    lines.append(f"  stage times (s): {stage_times(rec['timing'])}")
    measured, total = rec["calibration"].get("measure_seconds"), rec["timing"].get("total")
    if _is_number(measured) and _is_number(total) and total > 0:
        lines.append(f"  bound/error measurement (in calibrate): {measured:.1f} s, {100 * measured / total:.0f}% of the run")
    for kind, ratios in (rec["calibration"].get("clipping") or {}).items():
        lines.append(f"  learned {kind} clipping ratios: {ratios['min']:.3f} to {ratios['max']:.3f}, mean {ratios['mean']:.3f}")
    lines.append(f"  record: {record.record_path(results_dir, rec['run_id'])}")
    exported = record.export_dir(results_dir, rec["run_id"])
    if exported.is_dir():
        lines.append(f"  exported model: {exported}")
    return "\n".join(fit(line) for line in lines)


def fit(line: str, width: int = WIDTH) -> str:
    """A line of at most `width` columns: prose wraps (indented), a longer table row is cut."""
    if len(line) <= width:
        return line
    indent = " " * (len(line) - len(line.lstrip()) + 2)
    return textwrap.fill(line, width=width, subsequent_indent=indent, break_on_hyphens=False,
                         break_long_words=False)


def log_run_summary(rec: Mapping[str, Any], results_dir: str | Path, *, recorded_earlier: bool = False) -> str:
    """Log the run-end table as one record (its lines unprefixed, so all 110 columns are the table's).

    A summary that cannot be made is a warning: the run and its record are done by then."""
    try:
        text = run_summary(rec, results_dir, recorded_earlier=recorded_earlier)
    except Exception as err:
        log.warning("no run summary (%s: %s); the record is complete", type(err).__name__, err)
        return ""
    log.info("summary\n%s", text)
    return text


# --- the sweep -----------------------------------------------------------------------------------


@dataclass
class Job:
    """One job of a sweep as its marker tells it: number, run id, status, error, and its record if any."""

    number: int
    run_id: str | None
    status: str  # ran | recorded | failed | no record | unfinished
    error: str | None = None
    record: dict | None = None


LABELS = {"model": lambda rec: rec["model"], "quant": lambda rec: rec["quant"], "method": method_of}


def sweep_summary(jobs: Sequence[Job], results_dir: str | Path | None = None, title: str = "sweep") -> str:
    """One row per job: status, model/quant/method (in the title when the same for all), the config
    keys that differ between the jobs, seed, perplexities, averages, Δ vs full precision (first
    perplexity, last average), total seconds.

    Within WIDTH columns: only the first perplexity and the last average stay when all do not fit, then
    the differing keys move below the table (one line per job)."""
    done = [job for job in jobs if job.record is not None]
    statuses = ("ran", "recorded", "failed", "no record", "unfinished")
    counts = ", ".join(f"{n} {s}" for s in statuses if (n := sum(job.status == s for job in jobs)))
    heading = f"{title}: {len(jobs)} job{'s' if len(jobs) != 1 else ''}" + (f" ({counts})" if counts else "")
    shared = {name: values.pop() for name, label in LABELS.items()
              if len(values := {label(job.record) for job in done}) == 1}
    lines = [fit(" · ".join([heading, *shared.values()]))]
    if not jobs:
        return lines[0]
    rows = {job.number: tables.record_row(job.record) for job in done}
    varying = tables.varying_keys(pd.DataFrame(list(rows.values()))) if len(rows) > 1 else []
    metrics = _sweep_metrics([job.record for job in done])
    sweep = _SweepTable(
        jobs, rows, columns=[name for name in LABELS if name not in shared],
        references={job.number: mean_metrics(fp_references(job.record, results_dir))
                    for job in done if results_dir is not None and not is_fp_reference(job.record)},
        short=list(dict.fromkeys(metrics[:1] + [m for m in metrics if m in tables.AVERAGE_COLUMNS][-1:])),
    )
    for keys, shown in ((varying, metrics), (varying, sweep.short), ([], metrics), ([], sweep.short)):
        table = sweep.render(keys, shown)
        if _width(table) <= WIDTH:
            break
    lines += [line[:WIDTH] for line in table]
    if keys != varying:  # the differing keys did not fit: one line per job below the table
        for job in done:
            lines.append(fit(f"  #{job.number}: " + ", ".join(
                f"{tables.short_name(k)}={tables.shown_value(k, rows[job.number]) or '–'}" for k in varying)))
    notes = []
    if any(not m.startswith("ppl_") for m in metrics):
        notes.append(ACCURACY_NOTE)
    if any(sweep.references.values()):
        notes.append("Δ vs full precision, same model and evaluation")
    if notes:
        lines.append(fit(f"  ({'; '.join(notes)})"))
    lines += [fit(f"  #{job.number} {job.status}: {job.error}") for job in jobs if job.error]
    return "\n".join(lines)


@dataclass
class _SweepTable:
    """A sweep's rows, renderable with more or fewer columns (sweep_summary picks what fits)."""

    jobs: Sequence[Job]
    rows: dict[int, dict]  # job number -> its record as a table row (tables.record_row), for jobs with one
    columns: list[str]  # of LABELS, those that differ between the jobs
    references: dict[int, dict[str, float]]  # job number -> its full-precision reference's metrics
    short: list[str]  # the metrics kept when all do not fit

    def render(self, keys: list[str], shown: list[str]) -> list[str]:
        deltas = [m for m in self.short if m in shown and any(m in ref for ref in self.references.values())]
        header = ["#", "run", "status", *self.columns, *(tables.short_name(k) for k in keys), "seed",
                  *(display_name(m) for m in shown), *(f"Δ {display_name(m).removesuffix(' ppl')}" for m in deltas),
                  "time s"]
        right = [True, False, False, *(False for _ in self.columns), *(False for _ in keys), True,
                 *(True for _ in shown), *(True for _ in deltas), True]
        body = [self._row(job, keys, shown, deltas) if job.record is not None else
                [str(job.number), job.run_id or "?", job.status, *([""] * (len(header) - 3))] for job in self.jobs]
        return render(header, body, right)

    def _row(self, job: Job, keys: list[str], shown: list[str], deltas: list[str]) -> list[str]:
        rec, row = job.record, self.rows[job.number]
        values = metric_values(rec)
        reference = self.references.get(job.number, {})
        return [
            str(job.number), rec["run_id"], job.status, *(LABELS[name](rec) for name in self.columns),
            *(tables.shown_value(k, row) or "–" for k in keys), str(rec["seed"]),
            *(_number(values.get(m)) for m in shown),
            *(_delta(values.get(m), reference.get(m)) for m in deltas),
            _number(rec["timing"].get("total"), 0),
        ]


def _width(lines: Sequence[str]) -> int:
    return max((len(line) for line in lines), default=0)


def _sweep_metrics(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Perplexities and averages (tasks only when there is no average), in tables' order."""
    present: dict[str, None] = {}
    for rec in records:
        present.update(dict.fromkeys(metric_values(rec)))
    ppl = sorted(m for m in present if m.startswith("ppl_"))
    averages = [m for m in tables.AVERAGE_COLUMNS if m in present]
    tasks = sorted(m for m in present if not m.startswith("ppl_") and m not in tables.AVERAGE_COLUMNS)
    return ppl + (averages or tasks)
