"""Result records -> the paper's tables (pandas): a pure function of the records on disk.

Rows are methods (transform + weight quantizer), grouped by model and format; columns are the
perplexities, each task's accuracy (acc_norm where the task has it, else acc, in percent) and the
averages. Runs that differ only in seed are folded into mean ± std.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from latmix.evaluate import headline_accuracy
from latmix.record import SkippedRecord, iter_records

GROUP_KEYS = ["model", "quant", "method"]
AVERAGE_COLUMNS = ["avg6", "avg8", "avg"]
DISPLAY_NAMES = {"ppl_wikitext2": "Wiki2 ppl", "ppl_heldout": "heldout ppl", "ppl_ood": "ood ppl", "avg": "avg (all)"}


def method_label(transform: str, weight_quantizer: str, quantized: bool) -> str:
    """'hadamard+gptq'; just the transform when nothing is quantized (the full-precision rows)."""
    return f"{transform}+{weight_quantizer}" if quantized else transform


def record_row(rec: dict) -> dict:
    """One record flattened to one table row: identity columns, then metrics (accuracies in percent)."""
    quantized = rec["config"].get("quant", {}).get("weight_format") is not None
    row = {
        "run_id": rec["run_id"],
        "model": rec["model"],
        "quant": rec["quant"],
        "method": method_label(rec["transform"], rec["weight_quantizer"], quantized),
        "seed": rec["seed"],
    }
    metrics = rec["metrics"]
    row.update({f"ppl_{name}": value for name, value in metrics["ppl"].items()})
    for task, scores in metrics["tasks"].items():
        value = headline_accuracy(scores)
        row[task] = None if value is None else 100 * value
    averages = metrics["averages"]
    row.update({"avg6": averages.get("avg6"), "avg8": averages.get("avg8"), "avg": averages.get("mean")})
    row.update({key: None if row[key] is None else 100 * row[key] for key in AVERAGE_COLUMNS})
    return row


def load_results(results_dir: str | Path) -> tuple[pd.DataFrame, list[SkippedRecord]]:
    """All valid records as a frame (one row per run), and the records skipped with their reasons."""
    rows, skipped = [], []
    for item in iter_records(results_dir):
        if isinstance(item, SkippedRecord):
            skipped.append(item)
        else:
            rows.append(record_row(item))
    return pd.DataFrame(rows), skipped


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """Perplexities first, then tasks alphabetically, then the averages; only columns with a value."""
    identity = {*GROUP_KEYS, "run_id", "seed"}
    present = [c for c in frame.columns if c not in identity and frame[c].notna().any()]
    ppl = sorted(c for c in present if c.startswith("ppl_"))
    tasks = sorted(c for c in present if not c.startswith("ppl_") and c not in AVERAGE_COLUMNS)
    return ppl + tasks + [c for c in AVERAGE_COLUMNS if c in present]


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per (model, quant, method): columns '<metric>' (mean), '<metric>_std', 'seeds'."""
    if frame.empty:
        return pd.DataFrame(columns=[*GROUP_KEYS, "seeds"])
    columns = metric_columns(frame)
    numeric = frame[GROUP_KEYS + columns].astype({c: float for c in columns})
    grouped = numeric.groupby(GROUP_KEYS, sort=True)
    means = grouped[columns].mean()
    stds = grouped[columns].std(ddof=1).add_suffix("_std")
    seeds = frame.groupby(GROUP_KEYS, sort=True)["seed"].nunique().rename("seeds")
    return pd.concat([means, stds, seeds], axis=1).reset_index()


def _format_cell(mean: float, std: float, seeds: int) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if seeds > 1 and not pd.isna(std) else f"{mean:.2f}"


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Strings for the paper table: 'mean ± std' over seeds, metric columns under readable names."""
    columns = [c for c in summary.columns if c not in GROUP_KEYS and c != "seeds" and not c.endswith("_std")]
    shown = summary[GROUP_KEYS].copy()
    for column in columns:
        shown[DISPLAY_NAMES.get(column, column)] = [
            _format_cell(m, s, n)
            for m, s, n in zip(summary[column], summary[f"{column}_std"], summary["seeds"], strict=True)
        ]
    shown["seeds"] = summary["seeds"]
    return shown


def write_tables(summary: pd.DataFrame, out_dir: str | Path, name: str = "results") -> dict[str, Path]:
    """<name>.md (markdown), <name>.tex (LaTeX) and <name>.csv (numbers: means, stds, seeds)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = display_table(summary)
    paths = {fmt: out_dir / f"{name}.{fmt}" for fmt in ("md", "tex", "csv")}
    paths["md"].write_text(shown.to_markdown(index=False) + "\n")
    paths["tex"].write_text(shown.to_latex(index=False, escape=True))
    summary.to_csv(paths["csv"], index=False, float_format="%.6g")
    return paths


def load_reference(path: str | Path) -> pd.DataFrame:
    reference = pd.read_csv(path, dtype=str, keep_default_na=False)
    required = {"model_key", "quant_key", "method_key", "metric_key", "value", "source_id"}
    missing = required - set(reference.columns)
    if missing:
        raise ValueError(f"{path} lacks column(s) {', '.join(sorted(missing))}; see results/reference/README.md")
    return reference


def compare_with_reference(
    summary: pd.DataFrame, reference: pd.DataFrame, match_format: bool = True
) -> pd.DataFrame:
    """Ours beside published numbers for the same model, method and metric (and format unless told not).

    delta = ours - published. Published values that are not plain numbers (e.g. '2.2E3' is fine,
    a range is not) are left out.
    """
    ref = reference.assign(published=pd.to_numeric(reference["value"], errors="coerce")).dropna(subset=["published"])
    rows = []
    for _, ours in summary.iterrows():
        candidates = ref[(ref["model_key"] == ours["model"]) & (ref["method_key"] == ours["method"])]
        if match_format:
            candidates = candidates[candidates["quant_key"] == ours["quant"]]
        for _, published in candidates.iterrows():
            metric = published["metric_key"]
            column = f"ppl_{metric}" if f"ppl_{metric}" in summary.columns else metric
            if column not in summary.columns or pd.isna(ours[column]):
                continue
            rows.append({
                "model": ours["model"], "quant": ours["quant"], "method": ours["method"], "metric": metric,
                "ours": ours[column], "published": published["published"],
                "delta": ours[column] - published["published"], "published_format": published["quant_key"],
                "source": published["source_id"],
            })
    return pd.DataFrame(rows, columns=["model", "quant", "method", "metric", "ours", "published", "delta",
                                       "published_format", "source"])


def format_skipped(skipped: Iterable[SkippedRecord]) -> list[str]:
    return [f"skipped {item.path}: {item.reason}" for item in skipped]


def regenerate(
    results_dir: str | Path, out_dir: str | Path, reference: str | Path | None = None,
    match_format: bool = True,
) -> tuple[dict[str, Path], list[str]]:
    """The whole of make_tables.py: read records, write tables (and the comparison), return messages."""
    frame, skipped = load_results(results_dir)
    messages = format_skipped(skipped)
    summary = summarize(frame)
    paths = write_tables(summary, out_dir)
    if reference is not None and Path(reference).exists():
        comparison = compare_with_reference(summary, load_reference(reference), match_format)
        paths["vs_published"] = Path(out_dir) / "vs_published.md"
        paths["vs_published"].write_text(comparison.to_markdown(index=False, floatfmt=".2f") + "\n")
        comparison.to_csv(Path(out_dir) / "vs_published.csv", index=False, float_format="%.6g")
    return paths, messages

