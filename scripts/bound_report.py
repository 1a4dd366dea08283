"""The MX error bound across runs: does a lower bound come with a lower error and a lower perplexity?

    python scripts/bound_report.py                        # results/runs -> results/tables/bound.md
    python scripts/bound_report.py --results-dir DIR --out DIR
    python scripts/bound_report.py --figure bound.png --runs ID ID ...   # those runs per layer, one figure

For every record with per-layer rows (calib.measure): the mean over quantization points of the bound
and of the measured error after calibration, on the calibration sequences and on held-out ones; the
least tightness (error / bound); how many points break bound >= error (should be none); held-out
perplexity. Then Spearman's rank correlation across the quantized runs of each model and format (and all formats): bound vs error,
bound vs perplexity, error vs perplexity. Imports no torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from latmix.record import iter_records
from latmix.tables import configuration, configuration_id, method_label

# Relative slack for float rounding when checking bound >= error.
ROUNDING = 1e-6
CORRELATIONS = (("bound", "error"), ("bound", "ppl"), ("error", "ppl"))


def run_row(rec: dict) -> dict | None:
    """One run's bound summary, or None without per-layer rows."""
    rows = [r for r in rec["calibration"]["per_layer"] if r.get("bound_after") is not None]
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    held = frame.dropna(subset=["heldout_bound_after", "heldout_error_after"]) if "heldout_bound_after" in frame else frame.iloc[:0]
    broken = (frame["error_after"] > frame["bound_after"] * (1 + ROUNDING)).sum()
    if len(held):
        broken += (held["heldout_error_after"] > held["heldout_bound_after"] * (1 + ROUNDING)).sum()
    quantized = rec["config"].get("quant", {}).get("weight_format") is not None
    method = method_label(rec["transform"], rec["weight_quantizer"], quantized)
    return {
        "model": rec["model"], "quant": rec["quant"], "seed": rec["seed"], "run_id": rec["run_id"],
        "method": method, "quantized model": quantized_model_id(rec, method),
        "points": len(frame), "bound": frame["bound_after"].mean(), "error": frame["error_after"].mean(),
        "heldout bound": held["heldout_bound_after"].mean() if len(held) else None,
        "heldout error": held["heldout_error_after"].mean() if len(held) else None,
        "least tightness": (frame["error_after"] / frame["bound_after"]).min(),
        "bound < error": int(broken), "ppl": rec["metrics"]["ppl"].get("heldout"),
    }


def quantized_model_id(rec: dict, method: str) -> str:
    """Names the quantized model a run made: its configuration and seed without the evaluation keys, so
    one model evaluated twice (e.g. with more task items) is one point of the correlations."""
    made = {k: v for k, v in configuration(rec).items() if not k.startswith("eval.")}
    return configuration_id(rec["model"], rec["quant"], method, {**made, "seed": str(rec["seed"])})


def bound_table(records: Iterable[dict]) -> pd.DataFrame:
    rows = [row for rec in records if isinstance(rec, dict) and (row := run_row(rec)) is not None]
    columns = ["model", "quant", "method", "seed", "points", "bound", "error", "heldout bound", "heldout error",
               "least tightness", "bound < error", "ppl", "run_id", "quantized model"]
    return pd.DataFrame(rows, columns=columns).sort_values(["model", "quant", "bound"], ignore_index=True)


def rank_correlations(table: pd.DataFrame) -> pd.DataFrame:
    """Spearman's rho across quantized models (a model evaluated twice counts once), per model and
    format, and per model over all its formats."""
    rows = []
    for model, of_model in table.drop_duplicates("quantized model").groupby("model"):
        groups = [(quant, runs) for quant, runs in of_model.groupby("quant")]
        if len(groups) > 1:
            groups.append(("all", of_model))
        for quant, runs in groups:
            row = {"model": model, "quant": quant, "runs": len(runs)}
            for a, b in CORRELATIONS:
                row[f"{a} vs {b}"] = runs[a].rank().corr(runs[b].rank()) if len(runs) > 2 else None
            rows.append(row)
    return pd.DataFrame(rows)


def report(results_dir: Path) -> str:
    table = bound_table(iter_records(results_dir))
    if table.empty:
        return "no record with per-layer bound rows (calib.measure=true) under " + str(results_dir / "runs") + "\n"
    return (
        "# The MX error bound across runs\n\nMeans over quantization points, after calibration (error and bound: "
        "RMS over tokens of the per-token L2 norm; docs/calibration.md).\n\n"
        + table.drop(columns="quantized model").to_markdown(index=False, floatfmt=".4g")
        + "\n\nSpearman's rank correlation across runs (per model and format, then all formats):\n\n"
        + rank_correlations(table).to_markdown(index=False, floatfmt=".3f") + "\n"
    )


def figure_of_runs(results_dir: Path, run_ids: list[str], path: Path) -> Path:
    """The runs' per-layer bound and error after calibration on one figure, labelled by format, method, seed."""
    from latmix.figures import methods_per_layer_figure, save

    records = {rec["run_id"]: rec for rec in iter_records(results_dir) if isinstance(rec, dict)}
    missing = [rid for rid in run_ids if rid not in records]
    if missing:
        raise SystemExit(f"no record {', '.join(missing)} under {results_dir / 'runs'}: pass run ids from bound.md")
    runs = {}
    for rid in run_ids:
        rec = records[rid]
        quantized = rec["config"].get("quant", {}).get("weight_format") is not None
        label = f"{rec['quant']} {method_label(rec['transform'], rec['weight_quantizer'], quantized)} s{rec['seed']}"
        runs[label] = rec["calibration"]["per_layer"]
    title = f"{records[run_ids[0]]['model']}: bound (dashed) vs measured error (solid) per layer, after calibration"
    return save(methods_per_layer_figure(runs, title), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="holds runs/<run_id>.json")
    parser.add_argument("--out", type=Path, default=None, help="default: <results-dir>/tables")
    parser.add_argument("--figure", type=Path, default=None, help="draw --runs per layer into this file")
    parser.add_argument("--runs", nargs="+", default=[], help="run ids for --figure (the run_id column of bound.md)")
    args = parser.parse_args()
    if args.figure is not None:
        if not args.runs:
            parser.error("--figure needs --runs ID [ID ...] (the run_id column of bound.md)")
        print(figure_of_runs(args.results_dir, args.runs, args.figure))
        return
    text = report(args.results_dir)
    out = args.out or args.results_dir / "tables"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bound.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
