"""An ablation table: every configuration of one method, told apart by what it changes from a base.

    python scripts/ablation_table.py                                  # smollm2-135m, mxfp4, affine
    python scripts/ablation_table.py --model tiny_outliers --transform affine --base 0123456789ab
    python scripts/ablation_table.py --results-dir DIR --out DIR
    python scripts/ablation_table.py --renamed latmix=affine          # records made before the rename too
    python scripts/ablation_table.py --exclude '^calib epochs='       # leave superseded rows out

The rows are the recorded configurations of `--transform` on `--model` at `--quant` (mean ± std over
their seeds); each Δ is against the base at the row's own seeds (where the base ran them all), and
`lower` says at how many of those seeds a row's perplexity is below the base's, `p` how
likely differences that far from 0 are if each one's sign were chance (exact sign flips). The
base is the configuration of run `--base`, or else the one with the most seeds; every other row is
named by the config keys it changes (`smooth alpha=0.25`, `without down_proj`). The full-precision
reference and any other methods at the same format and evaluation are listed below it for scale, each
method's own preset first (the configuration that sets everything its conf/transform/<name>.yaml
sets, as the file sets it; else the most seeded). Writes <out>/ablation_<model>_<quant>_<transform>.md
and prints it. A column `env vs base` appears where some row's runs ran on another processor, thread
count or torch build than the base's at the same seeds (latmix/environment.py). Imports no torch.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import yaml

from latmix.environment import ENVIRONMENT_EFFECT, environment_differences
from latmix.paired import seed_sign_flip_p
from latmix.tables import (
    NAME_KEYS,
    flatten,
    load_runs,
    mean_std_text,
    metric_columns,
    most_seeded,
    short_name,
    summarize,
    value_text,
)

NAMED_METRICS = {"ppl_heldout": "held-out ppl", "ppl_ood": "ood ppl"}
ENVIRONMENT_COLUMN = "env vs base"
PLACEMENT_KEY = "transform.placements."
PRESETS_DIR = Path(__file__).resolve().parents[1] / "conf" / "transform"


def change(config: Mapping[str, str], base: Mapping[str, str]) -> str:
    """What a configuration changes from the base: 'smooth alpha=0.25', 'without down_proj', ...
    Keys a configuration lacks are told by their group (a whole placement removed reads as one), and
    one setting changed alike at several placements reads once ('block_size=32 at 3 placements')."""
    changed = _alike_placements({k: v for k, v in config.items() if k in base and base[k] != v})
    missing = {k.rsplit(".", 1)[0] for k in base if k not in config}
    removed_groups = sorted(g for g in missing if not any(k.startswith(g + ".") for k in config))
    removed = [f"without {short_name(group)}" for group in removed_groups]
    added = _alike_placements({k: v for k, v in config.items()
                               if k not in base and not (k in removed_groups and v == "null")})
    return ", ".join(removed + changed + added) or "(base)"


def _alike_placements(keys: Mapping[str, str]) -> list[str]:
    """'name=value' per key, sorted; placement keys with one setting and one value merged."""
    alike: dict[tuple[str, str], list[str]] = {}
    for key, value in keys.items():
        if key.startswith(PLACEMENT_KEY) and key.count(".") == 3:
            alike.setdefault((key.rsplit(".", 1)[1], value), []).append(key)
    merged = {key for group in alike.values() if len(group) > 1 for key in group}
    names = [f"{short_name(k)}={v}" for k, v in keys.items() if k not in merged]
    names += [f"{short_name(setting)}={value} at {len(group)} placements"
              for (setting, value), group in alike.items() if len(group) > 1]
    return sorted(names)


def ablation(
    runs: pd.DataFrame, model: str, quant: str, transform: str, base_run: str | None = None, exclude: str | None = None
) -> pd.DataFrame:
    """One row per configuration of the method: change from the base, seeds, metric means/stds, delta vs base;
    then the other methods at the same format and evaluation, and full precision, for scale. Rows of the
    method whose change matches the regular expression `exclude` are left out (superseded settings)."""
    superseded = _exclusion(exclude)
    summary = summarize(runs[runs["model"] == model]).reset_index(drop=True)
    method = summary[(summary["quant"] == quant) & (summary["transform"] == transform)]
    if method.empty:
        raise SystemExit(f"no record of transform={transform} at quant={quant} on model={model}")
    base = _base_row(method, base_run, f"transform={transform} runs at quant={quant} on model={model}")
    same_setting = summary[(summary["table"] == base["table"])]
    metrics = metric_names(same_setting)
    base_runs = runs[runs["config_id"] == base["config_id"]]
    runs_of = runs.groupby("config_id")

    def numbers(row: pd.Series) -> dict:
        if row["config_id"] == base["config_id"]:
            return {**_numbers(row, base, metrics, None), ENVIRONMENT_COLUMN: ""}
        row_runs = runs_of.get_group(row["config_id"])
        differences = _differences_by_seed(row_runs, base_runs, metrics)
        return {**_numbers(row, base, metrics, differences), ENVIRONMENT_COLUMN: _environment_vs_base(row_runs, base_runs)}

    rows = []
    for _, row in method[method["table"] == base["table"]].iterrows():  # same evaluation as the base
        label = change(row["config"], base["config"])
        if superseded is not None and label != "(base)" and superseded.search(label):
            continue
        rows.append({"change": label, "method": row["method"], **numbers(row), "_order": row[next(iter(metrics))]})
    rows.sort(key=lambda r: (r["change"] != "(base)", r["_order"]))
    others = same_setting[(same_setting["transform"] != transform) & ((same_setting["quant"] == quant)
                                                                      | same_setting["fp_reference"])]
    rows += [{"change": label, "method": row["method"], **numbers(row)} for label, row in _labelled_others(others)]
    table = pd.DataFrame(rows).drop(columns="_order")
    return table if (table[ENVIRONMENT_COLUMN] != "").any() else table.drop(columns=ENVIRONMENT_COLUMN)


def _exclusion(exclude: str | None) -> re.Pattern | None:
    try:
        return None if exclude is None else re.compile(exclude)
    except re.error as error:
        message = f"--exclude {exclude!r} is not a regular expression ({error}); escape ( ) [ ] + etc."
        raise SystemExit(message) from None


def _base_row(method: pd.DataFrame, base_run: str | None, what: str) -> pd.Series:
    """The configuration that ran `base_run`, or without one the configuration with the most seeds."""
    if base_run is None:
        return most_seeded(method)
    chosen = method[method["run_ids"].str.split().apply(lambda ids: base_run in ids)]
    if chosen.empty:
        raise SystemExit(f"run {base_run} is not among the {what}")
    return chosen.iloc[0]


def _labelled_others(others: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """Each row of another method (or full precision) with its label: the preset, and how the row's
    configuration differs from the one its preset's file sets."""
    labelled = []
    for _, group in others.groupby("method", sort=False):
        own_base = own_preset(group, preset_settings(group["transform"].iloc[0]))
        for _, row in group.iterrows():
            own = change(row["config"], own_base["config"]).replace("(base)", "")
            label = "full precision" if row["fp_reference"] else f"{row['transform']} preset"
            labelled.append((f"({label}{', ' + own if own else ''})", row))
    return labelled


def metric_names(summary: pd.DataFrame) -> dict[str, str]:
    """The table's metrics and their headers: each perplexity its evaluation measured (held-out and ood
    first, any other text, such as scripts/dev_split.py's dev part, by its name), then the task average."""
    present = metric_columns(summary)
    ppl = [m for m in NAMED_METRICS if m in present]
    ppl += sorted(m for m in present if m.startswith("ppl_") and m not in NAMED_METRICS)
    if not ppl:
        raise SystemExit("the base's records hold no perplexity: an ablation table orders its rows by one")
    names = {m: NAMED_METRICS.get(m, f"{m.removeprefix('ppl_')} ppl") for m in ppl}
    return names | ({"avg": "task avg %"} if "avg" in present else {})


def preset_settings(transform: str, presets_dir: Path = PRESETS_DIR) -> dict[str, str]:
    """The config keys a transform preset's file sets, flat, as records show them; {} without a file.
    Interpolations (`seed: ${seed}`) and name keys say nothing about the configuration and are left out."""
    path = presets_dir / f"{transform}.yaml"
    if not path.is_file():
        return {}
    text = path.read_text()
    tree = yaml.safe_load(text) or {}
    tree.pop("defaults", None)
    # Hydra reads the package from this header comment too; without it the file sits under `transform`.
    if "@package _global_" not in text:
        tree = {"transform": tree}
    return {key: value_text(value) for key, value in flatten(tree).items()
            if key not in NAME_KEYS and not (isinstance(value, str) and "${" in value)}


def own_preset(group: pd.DataFrame, settings: Mapping[str, str]) -> pd.Series:
    """The configuration that runs the preset as its file sets it (most seeds among those); else the most seeded."""
    as_shipped = group[group["config"].apply(lambda c: runs_as_the_file_sets_it(c, settings))]
    return most_seeded(as_shipped if settings and not as_shipped.empty else group)


def runs_as_the_file_sets_it(config: Mapping[str, str], settings: Mapping[str, str]) -> bool:
    """Every key the file sets has the file's value, and no map sits at a placement the file does not name:
    a placement added on the command line (`+ablation=o_proj`) leaves the file's own keys as they were."""
    named = placed(settings)
    return all(config.get(k) == v for k, v in settings.items()) and not (named and placed(config) - named)


def placed(config: Mapping[str, str]) -> set[str]:
    """The placements at which a flat configuration sets something other than null."""
    return {key.removeprefix(PLACEMENT_KEY).split(".")[0] for key, value in config.items()
            if key.startswith(PLACEMENT_KEY) and value not in (None, "null")}


def _differences_by_seed(
    row_runs: pd.DataFrame, base_runs: pd.DataFrame, metrics: Mapping[str, str]
) -> pd.DataFrame | None:
    """The row's metrics minus the base's, seed by seed, when the base ran every seed the row ran (None
    otherwise). A one-seed variant is then compared with the base at that seed, so the seed spread does
    not pass for an effect, and the spread of these differences says whether an effect holds at every seed."""
    if not set(row_runs["seed"]) <= set(base_runs["seed"]):
        return None
    columns = [m for m in metrics if m in row_runs and m in base_runs]
    by_seed = [frame.set_index("seed")[columns].astype(float) for frame in (row_runs, base_runs)]
    return (by_seed[0] - by_seed[1]).dropna(how="all")


def _environment_vs_base(row_runs: pd.DataFrame, base_runs: pd.DataFrame) -> str:
    """Where the row's runs ran differently from the base's at the same seeds ('threads 1 vs 2 at seed 0'), or ''."""
    by_seed = [dict(zip(frame["seed"], frame["env"], strict=True)) for frame in (row_runs, base_runs)]
    return "; ".join(environment_differences(*by_seed))


def _numbers(row: pd.Series, base: pd.Series, metrics: Mapping[str, str], differences: pd.DataFrame | None) -> dict:
    """Mean ± std over seeds; Δ against the base: the mean of the per-seed differences ± their std (two
    or more seeds), or against the base's mean over all its seeds where it did not run the row's. After
    each perplexity's Δ, at how many of the paired seeds the row's perplexity is below the base's, and
    the sign-flip p-value of those differences (latmix.paired.seed_sign_flip_p); both blank for the base
    and where the base did not run the row's seeds."""
    out = {"seeds": int(row["seeds"])}
    for metric, name in metrics.items():
        mean, std = row.get(metric), row.get(f"{metric}_std")
        paired = None if differences is None or metric not in differences else differences[metric].dropna()
        if mean is None or pd.isna(mean):
            out[name], out[f"Δ {name}"] = None, None
        else:
            out[name] = f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"
            out[f"Δ {name}"] = _delta(mean - base[metric], paired)
        if metric.startswith("ppl_"):
            unpaired = paired is None or paired.empty
            out[f"lower {name}"] = "" if unpaired else f"{(paired < 0).sum()} of {len(paired)}"
            out[f"p {name}"] = "" if unpaired else f"{seed_sign_flip_p(paired.to_numpy()):.3g}"
    return out


def _delta(against_mean: float, paired: pd.Series | None) -> str:
    if paired is None or paired.empty:
        return f"{against_mean:+.2f}"
    return mean_std_text(paired, sign="+")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="holds runs/<run_id>.json")
    parser.add_argument("--out", type=Path, default=None, help="default: <results-dir>/tables")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quant", default="mxfp4")
    parser.add_argument("--transform", default="affine")
    parser.add_argument("--base", default=None, help="a run id of the base configuration (default: most seeds)")
    parser.add_argument("--renamed", action="append", default=[], metavar="FORMER=PRESENT",
                        help="read records of a renamed preset under its present name (e.g. latmix=affine)")
    parser.add_argument("--exclude", default=None, metavar="REGEX",
                        help="leave out the method's rows whose change matches (e.g. '^calib epochs=')")
    args = parser.parse_args()
    renamed = dict(pair.split("=", 1) for pair in args.renamed)
    runs, _skipped, _records = load_runs(args.results_dir, renamed)
    table = ablation(runs, args.model, args.quant, args.transform, args.base, args.exclude)
    text = (f"# Ablation of {args.transform} on {args.model} at {args.quant}\n\n"
            "Mean ± std over seeds; Δ against the base row at the row's own seeds (a one-seed row against "
            "the base at that seed) where the base ran them: the mean of the per-seed differences ± their "
            "std, so an effect that holds at every seed shows a std below its mean; else against the base's "
            "mean. `lower` counts the paired seeds at which the row's perplexity is below the base's; `p` is "
            "the two-sided sign-flip p-value of those per-seed differences (at n seeds never below 2/2^n). "
            "Below the line: full precision and the other methods at the same format and evaluation."
            + (f" `{ENVIRONMENT_COLUMN}` names where a row's runs ran differently from the base's at the same "
               f"seeds: {ENVIRONMENT_EFFECT}, so such a Δ is not the change's alone."
               if ENVIRONMENT_COLUMN in table else "")
            + "\n\n" + table.to_markdown(index=False, disable_numparse=True) + "\n")
    out = args.out or args.results_dir / "tables"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ablation_{args.model}_{args.quant}_{args.transform}.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
