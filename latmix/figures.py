"""Figures, without torch: per run (activation histograms, the bound vs the measured error, saved next
to each run) and for the tables (metrics per method with seed error bars, per-layer bound vs error).

Drawn with matplotlib's object API (`Figure`, no pyplot): nothing global is set at import and no
display is needed on cluster nodes. `make_figures` is what `scripts/make_tables.py` draws.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from latmix.tables import Table

# The seven quantized linears of a Llama block, in the order data flows through them.
ROLE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (record key, colour, line style, legend): bounds dashed, measured errors solid; before blue, after orange.
PER_LAYER_SERIES = (
    ("bound_before", "C0", "--", "bound, before"),
    ("error_before", "C0", "-", "error, before"),
    ("bound_after", "C1", "--", "bound, after"),
    ("error_after", "C1", "-", "error, after"),
)
FORMATS = ("png", "pdf")


# --- per run -------------------------------------------------------------------------------------


def activation_histograms(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], path: str | Path
) -> Path:
    """One row per layer: the quantized activation's values before and after the transform (log counts).

    The title of each panel gives max|x| / rms, the crest factor that MX block scales suffer from.
    """
    layers = [name for name in before if name in after]
    if not layers:
        raise ValueError("no layer has activations both before and after the transform")
    fig = Figure(figsize=(8, 1.8 * len(layers)), layout="constrained")
    axes = fig.subplots(len(layers), 2, squeeze=False)
    for row, name in enumerate(layers):
        for col, (label, acts) in enumerate((("before", before[name]), ("after", after[name]))):
            values = acts.detach().float().flatten().cpu()
            crest = (values.abs().max() / values.pow(2).mean().sqrt().clamp_min(1e-12)).item()
            ax = axes[row][col]
            ax.hist(values.numpy(), bins=100, log=True, color="tab:blue" if col == 0 else "tab:orange")
            ax.set_title(f"{name} {label}: max/rms {crest:.1f}", fontsize=8)
            ax.tick_params(labelsize=6)
    return save(fig, path)


def bound_vs_error(per_layer: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Per layer: the error bound and the measured quantization error, before and after calibration."""
    return save(per_layer_figure(per_layer, title), path)


def layer_role(name: str) -> str:
    """'model.layers.3.mlp.down_proj' -> 'down_proj'."""
    return name.rsplit(".", 1)[-1]


def _positive(value: Any) -> float:
    """A value for a log axis: NaN (a gap) for missing, zero or negative."""
    return float(value) if isinstance(value, (int, float)) and value > 0 else math.nan


def _role_order(role: str) -> tuple[int, str]:
    """Data-flow order for the seven Llama roles, then any other role by name."""
    return (ROLE_ORDER.index(role), "") if role in ROLE_ORDER else (len(ROLE_ORDER), role)


def _rows_by_role(per_layer: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, list[Mapping[str, Any]]]:
    """The rows with a value under any of keys, grouped by linear role in data-flow order."""
    by_role: dict[str, list[Mapping[str, Any]]] = {}
    for index, row in enumerate(per_layer):
        if any(not math.isnan(_positive(row.get(k))) for k in keys):
            by_role.setdefault(layer_role(str(row.get("layer", index))), []).append(row)
    return {role: by_role[role] for role in sorted(by_role, key=_role_order)}


def _role_panels(roles: Sequence[str], width: float = 6.5) -> tuple[Figure, list[Any]]:
    """One log-y panel per role (two columns past three roles), x shared, the x label on each column's last."""
    ncols = 1 if len(roles) <= 3 else 2
    nrows = math.ceil(len(roles) / ncols)
    fig = Figure(figsize=(width * ncols, 2.1 * nrows + 1.0), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    for position in range(len(roles), nrows * ncols):
        axes[position // ncols][position % ncols].set_visible(False)
    for col in range(min(ncols, len(roles))):
        bottom = max(r for r in range(nrows) if r * ncols + col < len(roles))
        axes[bottom][col].tick_params(labelbottom=True)
    panels = [axes[position // ncols][position % ncols] for position in range(len(roles))]
    for position, ax in enumerate(panels):
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(labelsize=7)
        if position % ncols == 0:
            ax.set_ylabel("‖error‖", fontsize=8)
    return fig, panels


def _x_positions(rows: Sequence[Mapping[str, Any]]) -> tuple[list[int], str]:
    if all(isinstance(row.get("block"), int) for row in rows):
        return [row["block"] for row in rows], "block"
    return list(range(len(rows))), "layer index"


def per_layer_figure(per_layer: Sequence[Mapping[str, Any]], title: str | None = None) -> Figure:
    """One panel per linear role (q/k/v/o/gate/up/down), x = block, log y: the bound dashed, the
    measured error solid, before (blue) and after (orange) calibration. Readable at 200+ layers
    because each panel holds one point per block."""
    by_role = _rows_by_role(per_layer, [series[0] for series in PER_LAYER_SERIES])
    if not by_role:
        raise ValueError("the calibration report has no bound or error measurements per layer")
    fig, panels = _role_panels(list(by_role))
    for ax, (role, points) in zip(panels, by_role.items(), strict=True):
        xs, xlabel = _x_positions(points)
        for key, colour, style, label in PER_LAYER_SERIES:
            ys = [_positive(row.get(key)) for row in points]
            if not all(math.isnan(y) for y in ys):
                ax.plot(xs, ys, color=colour, linestyle=style, marker="." if len(xs) <= 64 else None,
                        markersize=3, linewidth=1.2, label=label)
        tightness = sorted(row["tightness_after"] for row in points
                           if isinstance(row.get("tightness_after"), (int, float)))
        median = f", median error/bound after {tightness[len(tightness) // 2]:.2f}" if tightness else ""
        ax.set_title(f"{role} ({len(points)} layers{median})", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
    handles, labels = panels[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=4, fontsize=8)
    n_rows = sum(len(points) for points in by_role.values())
    fig.suptitle(title or f"bound vs measured error, {n_rows} quantized linears", fontsize=10)
    return fig


def methods_per_layer_figure(runs: Mapping[str, Sequence[Mapping[str, Any]]], title: str | None = None) -> Figure:
    """Several runs on one figure, {label: per_layer rows}: one panel per linear role, x = block, log y,
    one colour per run, its bound dashed and its measured error solid (after calibration)."""
    by_run = {label: _rows_by_role(rows, ("bound_after", "error_after")) for label, rows in runs.items()}
    roles = list(dict.fromkeys(role for by_role in by_run.values() for role in by_role))
    if not roles:
        raise ValueError("none of the runs has bound or error measurements per layer")
    roles.sort(key=_role_order)
    fig, panels = _role_panels(roles)
    for ax, role in zip(panels, roles, strict=True):
        for index, (label, by_role) in enumerate(by_run.items()):
            points = by_role.get(role, [])
            xs, xlabel = _x_positions(points)
            for key, style, what in (("bound_after", "--", "bound"), ("error_after", "-", "error")):
                ax.plot(xs, [_positive(row.get(key)) for row in points], color=f"C{index % 10}", linestyle=style,
                        linewidth=1.2, label=f"{label}: {what}")
            ax.set_xlabel(xlabel, fontsize=8)
        ax.set_title(role, fontsize=9)
    handles, labels = panels[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(runs), fontsize=8)  # a column per run
    fig.suptitle(title or "bound (dashed) vs measured error (solid) per layer, after calibration", fontsize=10)
    return fig


# --- for the tables ------------------------------------------------------------------------------


def row_label(row: Mapping[str, Any], varying: Sequence[str]) -> str:
    """'mxfp4 · affine+gptq · residual param lu': what tells a table row from the others."""
    from latmix.tables import short_name, shown_value

    shown = {k: shown_value(k, row, missing="") for k in varying}
    extra = [f"{short_name(k)} {value}" for k, value in shown.items() if value and not row["fp_reference"]]
    return " · ".join([row["quant"], row["method"], *extra])


def metrics_figure(table: Table, runs: pd.DataFrame) -> Figure:
    """One panel per perplexity and per accuracy average: mean ± std over seeds per row of the table
    (each seed a small cross), the full-precision reference as a dashed line."""
    from latmix.tables import AVERAGE_COLUMNS, DISPLAY_NAMES, lower_is_better

    metrics = [m for m in table.metrics if m.startswith("ppl_") or m in AVERAGE_COLUMNS]
    if not metrics:
        raise ValueError(f"table {table.label} has no perplexity or accuracy average to plot")
    rows = list(table.rows.to_dict("records"))
    labels = [row_label(row, table.varying) for row in rows]
    quants = list(dict.fromkeys(row["quant"] for row in rows if not row["fp_reference"]))
    fig = Figure(figsize=(3.6 * len(metrics) + 2.5, 0.32 * len(rows) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    ys = list(range(len(rows)))
    for ax, metric in zip(axes, metrics, strict=True):
        for y, row in zip(ys, rows, strict=True):
            if math.isnan(row[metric]):
                continue
            colour = "0.4" if row["fp_reference"] else f"C{quants.index(row['quant']) % 10}"
            std = row[f"{metric}_std"]
            ax.errorbar([row[metric]], [y], xerr=[0 if math.isnan(std) else std], fmt="o", color=colour,
                        capsize=3, markersize=4)
            seeds = runs.loc[runs["config_id"] == row["config_id"], metric].dropna().astype(float)
            ax.plot(list(seeds), [y] * len(seeds), "x", color=colour, markersize=3, alpha=0.6)
            if row["fp_reference"]:
                ax.axvline(row[metric], color="0.4", linestyle="--", linewidth=1)
        values = [row[metric] for row in rows if not math.isnan(row[metric])]
        if lower_is_better(metric) and values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_xscale("log")
        better = "lower" if lower_is_better(metric) else "higher"
        unit = "" if lower_is_better(metric) else " (%)"
        ax.set_title(f"{DISPLAY_NAMES.get(metric, metric)}{unit}, {better} is better", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].set_yticks(ys, labels)
    axes[0].invert_yaxis()
    fig.suptitle(f"{table.heading}: mean ± std over seeds (x: each seed; dashed: full precision)", fontsize=10)
    return fig


def run_title(rec: Mapping[str, Any], details: str = "") -> str:
    """The run's identity: model, format, method, seed, run id (and what tells its configuration apart)."""
    from latmix.tables import record_row

    row = record_row(dict(rec))
    title = f"{row['model']} · {row['quant']} · {row['method']} · seed {row['seed']} · run {row['run_id']}"
    return f"{title}\n{details}" if details else title


def make_figures(
    tables: Sequence[Table], runs: pd.DataFrame, records: Mapping[str, Mapping[str, Any]], out_dir: str | Path,
    run_ids: Iterable[str] | None = None, max_layer_figures: int = 6,
) -> tuple[dict[str, Path], list[str]]:
    """What make_tables draws: per table, its metrics figure; per chosen run, per-layer bound vs error
    (default: the first seed of each configuration that has per-layer data, up to max_layer_figures).
    PNG and PDF; returns {name: path} and messages for the user."""
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    messages: list[str] = []
    details: dict[str, str] = {}
    for table in tables:
        for row in table.rows.to_dict("records"):
            details[row["config_id"]] = " · ".join(row_label(row, table.varying).split(" · ")[2:])
        try:
            fig = metrics_figure(table, runs)
        except ValueError as err:
            messages.append(f"no metrics figure: {err}")
            continue
        stem = re.sub(r"[^A-Za-z0-9.-]+", "-", table.label.removeprefix("tab:"))
        paths.update(save_formats(fig, out_dir / f"{stem}_metrics"))
    has_layers = {rid for rid, rec in records.items() if rec["calibration"].get("per_layer")}
    if run_ids:
        chosen = []
        for rid in run_ids:
            if rid not in records:
                messages.append(f"--run-id {rid}: no such record")
            elif rid not in has_layers:
                messages.append(f"--run-id {rid}: the record has no per-layer calibration data")
            else:
                chosen.append(rid)
    else:
        firsts = runs[runs["run_id"].isin(has_layers)].sort_values("seed").drop_duplicates("config_id")
        order = {row["config_id"]: i for i, row in enumerate(r for t in tables for r in t.rows.to_dict("records"))}
        candidates = sorted(firsts.itertuples(), key=lambda r: order.get(r.config_id, len(order)))
        chosen = [r.run_id for r in candidates[:max_layer_figures]]
        if len(candidates) > max_layer_figures:
            messages.append(f"per-layer figures for {max_layer_figures} of {len(candidates)} configurations "
                            "with per-layer data; choose runs with --run-id")
    for rid in chosen:
        rec = records[rid]
        config_id = runs.loc[runs["run_id"] == rid, "config_id"].iloc[0]
        title = run_title(rec, details.get(config_id, ""))
        fig = per_layer_figure(rec["calibration"]["per_layer"], title)
        paths.update(save_formats(fig, out_dir / f"per_layer_{rid}"))
    return paths, messages


# --- files ---------------------------------------------------------------------------------------


def save(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def save_formats(fig: Figure, stem: str | Path, formats: Sequence[str] = FORMATS) -> dict[str, Path]:
    """<stem>.png and <stem>.pdf; keys 'figure <name>.<fmt>'."""
    stem = Path(stem)
    return {f"figure {stem.name}.{fmt}": save(fig, stem.parent / f"{stem.name}.{fmt}", dpi=150) for fmt in formats}
