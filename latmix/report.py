"""make_tables.py as a function: records -> the tables, the comparison with published numbers, the figures.

tables.py builds the tables and figures.py draws them; this module only runs the two in order, so
tables.py never imports figures.py (matplotlib is imported only when figures are asked for).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from latmix.environment import ENVIRONMENT_EFFECT, environment_spread
from latmix.record import SkippedRecord
from latmix.tables import (
    UNCOMMITTED_MARK,
    build_tables,
    compare_with_reference,
    comparison_markdown,
    load_reference,
    load_runs,
    summarize,
    write_tables,
)


def format_skipped(skipped: Iterable[SkippedRecord]) -> list[str]:
    return [f"skipped {item.path}: {item.reason}" for item in skipped]


def format_uncommitted(frame: pd.DataFrame) -> list[str]:
    """One line naming the runs whose code differed from their commit: their rows are marked, not dropped."""
    run_ids = sorted(frame.loc[frame["uncommitted"], "run_id"])
    if not run_ids:
        return []
    shown = " ".join(run_ids[:8]) + (f" and {len(run_ids) - 8} more" if len(run_ids) > 8 else "")
    return [f"{len(run_ids)} run(s) made with uncommitted code changes (marked {UNCOMMITTED_MARK} in the tables; "
            f"not reproducible from their git_sha alone): {shown}"]


def format_mixed_environments(frame: pd.DataFrame) -> list[str]:
    """One line naming the configurations whose seeds ran on different processors, thread counts or torch
    builds: their mean ± std mixes machines' differences with the seeds'."""
    mixed = []
    for config_id, runs in frame.groupby("config_id", sort=False):
        spread = environment_spread(runs["env"])
        if spread:
            first = runs.iloc[0]
            mixed.append(f"{first['method']} at {first['quant']} on {first['model']} ({config_id}: {'; '.join(spread)})")
    if not mixed:
        return []
    shown = ", ".join(mixed[:8]) + (f" and {len(mixed) - 8} more" if len(mixed) > 8 else "")
    return [f"{len(mixed)} configuration(s) average seeds run in different environments ({ENVIRONMENT_EFFECT}): "
            f"{shown}"]


def regenerate(
    results_dir: str | Path, out_dir: str | Path, reference: str | Path | None = None,
    match_format: bool = True, figures: bool = False, run_ids: Iterable[str] | None = None,
    max_layer_figures: int = 6,
) -> tuple[dict[str, Path], list[str]]:
    """Read records, write tables (and the comparison, and figures if asked); return paths and messages."""
    frame, skipped, records = load_runs(results_dir)
    messages = format_skipped(skipped) + format_uncommitted(frame) + format_mixed_environments(frame)
    summary = summarize(frame)
    paths = write_tables(summary, out_dir)
    out_dir = Path(out_dir)
    if reference is not None and Path(reference).exists():
        published = load_reference(reference)
        comparison = compare_with_reference(summary, published, match_format)
        paths["vs_published"] = out_dir / "vs_published.md"
        paths["vs_published"].write_text(comparison_markdown(comparison, summary, published, match_format))
        paths["vs_published_csv"] = out_dir / "vs_published.csv"
        comparison.to_csv(paths["vs_published_csv"], index=False, float_format="%.6g")
        if comparison.empty:
            messages.append(f"no published number matches ours: {paths['vs_published']} says why")
    if figures:
        from latmix import figures as plots  # matplotlib only when figures are asked for

        figure_paths, figure_messages = plots.make_figures(
            build_tables(summary), frame, records, out_dir / "figures", run_ids, max_layer_figures)
        paths.update(figure_paths)
        messages += figure_messages
    return paths, messages
