"""Two methods compared seed for seed on perplexity and item for item on the zero-shot tasks.

    python scripts/paired_tasks.py --quant mxfp6 affine block_hadamard
    python scripts/paired_tasks.py --quant mxfp4 0123456789ab block_hadamard+gptq   # a configuration id
    python scripts/paired_tasks.py --model tiny --quant mxfp4 affine hadamard --results-dir DIR
    python scripts/paired_tasks.py --quant mxfp6 affine identity --b-quant none      # against full precision

A and B are each a method label (affine+gptq), a transform (affine), a configuration id or the id of
one of its runs (the first characters of an id are enough), at --model and --quant (B at --b-quant
where given). The seeds both ran are paired (a full-precision B, which draws nothing at random, pairs
its one record with each of A's seeds); see latmix/paired.py for the statistics. Prints two markdown
tables: one row per perplexity text both measured (each seed's A - B, their mean ± std, at how many
seeds A is lower, the sign-flip p), and, where both arms' records hold per-item answers
(eval.task_items) for the same items, one row per task and one for all tasks (A - B in points, its 95%
interval, a p-value). A warning follows where the paired runs ran on different processors, thread
counts or torch builds (latmix/environment.py). Imports no torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from latmix.environment import ENVIRONMENT_EFFECT, environment_differences
from latmix.paired import PairedPerplexity, PairedRow, PairingError, paired_perplexities, paired_rows
from latmix.tables import load_runs, mean_std_text


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="method label, transform or configuration id")
    parser.add_argument("b", help="method label, transform or configuration id")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quant", default="mxfp4")
    parser.add_argument("--b-quant", default=None, help="B's format when it differs (none: full precision)")
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="holds runs/<run_id>.json")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap and sign-flip draws")
    return parser.parse_args()


def select(
    frame: pd.DataFrame, records: dict[str, dict], name: str, model: str, quant: str
) -> tuple[str, dict[int, dict]]:
    """(method label, its records by seed) of the one configuration of `name`; where only some of the
    matching configurations hold per-item answers, the one among those."""
    where = f"{name!r} at {model} {quant}"
    rows = frame[(frame["model"] == model) & (frame["quant"] == quant)] if not frame.empty else frame
    if not rows.empty:
        named_runs = rows[rows["run_id"].str.startswith(name)]["config_id"]
        rows = rows[rows["config_id"].str.startswith(name) | rows["config_id"].isin(named_runs)
                    | (rows["method"] == name) | (rows["transform"] == name)]
    if rows.empty:
        raise SystemExit(f"no record of {where}; check the name, --model, --quant and --results-dir")
    with_items = rows[rows["run_id"].map(lambda run: has_task_items(records[run]))]
    rows = rows if with_items.empty else with_items
    seeds = rows.groupby("config_id")["seed"].apply(lambda s: ", ".join(map(str, sorted(s))))
    if len(seeds) > 1:
        listed = "; ".join(f"{config} (seeds {s})" for config, s in seeds.items())
        raise SystemExit(f"several configurations of {where} match: {listed}; name one by its id")
    return rows["method"].iloc[0], {int(row.seed): records[row.run_id] for row in rows.itertuples()}


def has_task_items(rec: dict) -> bool:
    return bool(rec.get("eval", {}).get("task_items"))


def perplexity_markdown(rows: list[PairedPerplexity]) -> str:
    table = pd.DataFrame([
        {
            "text": row.text,
            "seeds": len(row.seeds),
            "A": mean_std_text(row.a),
            "B": mean_std_text(row.b),
            "A - B per seed": ", ".join(f"{d:+.2f}" for d in row.differences),
            "Δ": mean_std_text(row.differences, sign="+"),
            "A lower": f"{row.lower} of {len(row.seeds)}",
            "p": f"{row.p_value:.3f}",
        }
        for row in rows
    ])
    return table.to_markdown(index=False, disable_numparse=True)


def markdown(rows: list[PairedRow]) -> str:
    table = pd.DataFrame([
        {
            "task": row.task,
            "items x seeds": f"{row.items} x {row.seeds}",
            "A %": f"{row.accuracy_a:.2f}",
            "B %": f"{row.accuracy_b:.2f}",
            "Δ": f"{row.delta:+.2f}",
            "95% interval": f"[{row.low:+.2f}, {row.high:+.2f}]",
            "only A right": row.only_a,
            "only B right": row.only_b,
            "p": f"{row.p_value:.3f}" if row.p_value >= 0.001 else "< 0.001",  # draws resolve no finer
        }
        for row in rows
    ])
    return table.to_markdown(index=False, disable_numparse=True)


def main() -> None:
    args = parse_args()
    frame, _, records = load_runs(args.results_dir)
    label_a, a = select(frame, records, args.a, args.model, args.quant)
    b_quant = args.b_quant or args.quant
    label_b, b = select(frame, records, args.b, args.model, b_quant)
    if b_quant == "none" and len(b) == 1:
        b = dict.fromkeys(a, next(iter(b.values())))  # full precision draws nothing: one record serves every seed
    if a == b:
        raise SystemExit(f"{args.a!r} and {args.b!r} name the same configuration; compare two different ones")
    try:
        perplexities = paired_perplexities(a, b)
        both_have_items = all(has_task_items(arm[seed]) for arm in (a, b) for seed in set(a) & set(b))
        rows = paired_rows(a, b, resamples=args.resamples) if both_have_items else None
    except PairingError as err:
        raise SystemExit(str(err)) from None
    formats = args.quant if b_quant == args.quant else f"A {args.quant}, B {b_quant}"
    print(f"{args.model} · {formats} · A = {label_a}, B = {label_b} · "
          f"seeds {', '.join(map(str, sorted(set(a) & set(b))))} paired")
    print(f"\nPerplexity, Δ = A - B:\n{perplexity_markdown(perplexities)}")
    if rows is None:
        print("\nNo task pairs: not every record holds per-item answers (eval.task_items; runs with "
              "eval.tasks=[] have none, nor records written before they were recorded: run those again "
              "with force=true).")
    else:
        print(f"\nTasks, Δ = A - B in points, {args.resamples} draws:\n{markdown(rows)}")
    differences = environment_differences(*({seed: rec.get("env") for seed, rec in arm.items()} for arm in (a, b)))
    if differences:
        print(f"\nwarning: A and B ran in different environments ({'; '.join(differences)}); "
              f"{ENVIRONMENT_EFFECT}. Run both arms on one machine at one OMP_NUM_THREADS for a difference "
              "that is the methods'.")


if __name__ == "__main__":
    main()
