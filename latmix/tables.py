"""Result records -> the paper's tables (pandas): a pure function of the records on disk.

A *configuration* is a record's resolved config minus the seed (and the per-stage seeds that are the
run seed), minus what only says where or how a run executes (`record.NON_IDENTITY_KEYS`,
`EXECUTION_KEYS`) and the preset names the row labels already show. Runs of one configuration are
folded into mean ± std over seeds; runs of different configurations never are.

One table per model and evaluation setting (the `model.*` and `eval.*` keys), so each table has one
full-precision reference (quant none, identity transform), shown first; then the quantized rows,
grouped by format, one row per method (transform + weight quantizer). Any other config key that
differs between rows of a table becomes a column. Columns: perplexities, each task's accuracy
(acc_norm where the task has it, else acc, in percent), the averages, and the delta vs the
full-precision row; the best value per format is marked.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from latmix.metrics import headline_accuracy
from latmix.record import SkippedRecord, calibration_learned, canonical_json, identity, iter_records

# Keys that say how a run executes, not what it computes (the results do not depend on them).
EXECUTION_KEYS = ("device", "calib.offload", "calib.grad_checkpointing", "calib.checkpoint_every")
# Preset names: shown as the model, quant and method labels of every row.
NAME_KEYS = ("model.name", "quant.name", "transform.name")
# Per-stage seeds that interpolate the run seed (`seed: ${seed}`); set to anything else, they count.
SEED_KEYS = ("calib.seed", "transform.seed")
# The keys that split tables: one table per model and evaluation setting.
SETTING_PREFIXES = ("model.", "eval.")
# Keys that can change the full-precision reference (nothing is calibrated or quantized there).
FP_REFERENCE_PREFIXES = ("model.", "eval.", "quant.", "transform.")
# Keys that only say how maps are learned: a run that learned nothing shows calib.mode none and not these.
LEARNING_PREFIXES = ("optim.",)
LEARNING_KEYS = ("calib.objective", "calib.batch_size", "calib.micro_batch_size", "calib.epochs", "calib.steps",
                 "calib.reg_weight", "calib.learn_clipping", "calib.cond_limit", "calib.online_maps",
                 "calib.quantize_weights", "calib.rounding")
# Keys the quant and method labels stand for: shown as a column only where a label does not tell them.
LABEL_PREFIXES = ("quant.", "transform.")

AVERAGE_COLUMNS = ["avg6", "avg8", "avg"]
DISPLAY_NAMES = {"ppl_wikitext2": "Wiki2 ppl", "ppl_heldout": "heldout ppl", "ppl_ood": "ood ppl", "avg": "avg (all)"}
# Row order within a format: least to most expressive transform (DESIGN.md), RTN before GPTQ.
QUANT_ORDER = ("none", "mxfp8", "mxint8", "mxfp6", "nvfp4", "mxfp4")
TRANSFORM_ORDER = (
    "identity", "hadamard", "block_hadamard", "rotation", "flatquant", "affine_block", "affine_literal", "affine",
    "affine_learned", "affine_recipe",
)
WEIGHT_QUANTIZER_ORDER = ("rtn", "gptq")
SHORT_WORDS = {"parametrization": "param", "n_samples": "samples", "max_seq_len": "seq len",
               "max_ppl_tokens": "ppl tokens", "weight_quantizer": "wq", "reg_weight": "reg",
               "ppl_datasets": "ppl data", "num_fewshot": "fewshot", "name_or_path": "path"}
FP_NOTE = "full precision: quant none, identity transform"


def method_label(transform: str, weight_quantizer: str, quantized: bool) -> str:
    """'hadamard+gptq'; just the transform when nothing is quantized (the full-precision rows)."""
    return f"{transform}+{weight_quantizer}" if quantized else transform


# --- one record -> one row -----------------------------------------------------------------------


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and empty mappings are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def value_text(value: Any) -> str:
    """A config value as a table shows it: null, true, 0.001, heldout,ood."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return ",".join(value_text(v) for v in value)
    return json.dumps(value, sort_keys=True, default=str)


def mean_std_text(values: Iterable[float], sign: str = "") -> str:
    """Values as a table shows them: 'mean ± std' (sample std) to two decimals, the mean alone for one
    value; sign "+" writes the mean's sign, for differences."""
    values = pd.Series(list(values), dtype=float)
    spread = f" ± {values.std():.2f}" if len(values) > 1 else ""
    return f"{values.mean():{sign}.2f}{spread}"


def is_full_precision(rec: Mapping[str, Any]) -> bool:
    quant = rec["config"].get("quant", {})
    return all(quant.get(key) is None for key in ("weight_format", "act_format", "kv_format"))


def configuration(rec: Mapping[str, Any]) -> dict[str, str]:
    """What the run computes, as flat 'dotted.key' -> text: the run's identity (record.identity: a setting
    added later is absent at its implicit earlier value, so older and newer seeds of one configuration
    group together) minus seed, names and execution keys. The full-precision reference keeps only what
    can change its numbers."""
    config = {k: v for k, v in identity(rec["config"]).items() if k != "seed"}
    kept = {}
    for key, value in flatten(config).items():
        if key in EXECUTION_KEYS or key in NAME_KEYS or (key in SEED_KEYS and value == rec["seed"]):
            continue
        kept[key] = value_text(value)
    if is_full_precision(rec) and rec["transform"] == "identity":
        kept = {k: v for k, v in kept.items() if k.startswith(FP_REFERENCE_PREFIXES)}
    return kept


def configuration_id(model: str, quant: str, method: str, config: Mapping[str, str]) -> str:
    """12 hex chars naming a configuration (the run id without the seed): same config, same id."""
    identity = {"model": model, "quant": quant, "method": method, "config": dict(config)}
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:12]


def applies(key: str, row: Mapping[str, Any]) -> bool:
    """Whether a config key can change this row's numbers: the full-precision reference only has its own
    keys, and a run that learned nothing has no learning settings (its calib.mode reads none)."""
    if row["fp_reference"] and not key.startswith(FP_REFERENCE_PREFIXES):
        return False
    return row["learned"] or not (key in LEARNING_KEYS or key.startswith(LEARNING_PREFIXES))


def shown_value(key: str, row: Mapping[str, Any], missing: str | None = "–") -> str | None:
    """A config key's value as a table shows it for this row: '' where it does not apply, calib.mode as
    what calibration did (none when it learned nothing), `missing` where the record lacks the key."""
    if not applies(key, row):
        return ""
    if key == "calib.mode" and not row["learned"]:
        return "none"
    return row["config"].get(key, missing)


def record_row(rec: dict) -> dict:
    """One record flattened to one table row: identity columns, then metrics (accuracies in percent)."""
    full_precision = is_full_precision(rec)
    quantized = rec["config"].get("quant", {}).get("weight_format") is not None
    config = configuration(rec)
    setting = {k: v for k, v in config.items() if k.startswith(SETTING_PREFIXES)}
    method = method_label(rec["transform"], rec["weight_quantizer"], quantized)
    row = {
        "run_id": rec["run_id"],
        "model": rec["model"],
        "quant": rec["quant"],
        "method": method,
        "transform": rec["transform"],
        "weight_quantizer": rec["weight_quantizer"] if quantized else "",
        "fp_reference": full_precision and rec["transform"] == "identity",
        "learned": calibration_learned(rec),
        "seed": rec["seed"],
        "uncommitted": bool(rec.get("git_uncommitted")),
        "env": rec.get("env") or {},
        "config_id": configuration_id(rec["model"], rec["quant"], method, config),
        "setting_id": configuration_id(rec["model"], "", "", setting),
        "config": config,
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


RUN_COLUMNS = ["run_id", "model", "quant", "method", "transform", "weight_quantizer", "fp_reference", "learned",
               "seed", "uncommitted", "env", "config_id", "setting_id", "config"]
# Per configuration, beside run_ids: the runs made with code that differed from their commit (record.uncommitted_code).
# env (where each run ran: latmix.environment) is per run, so not summarized.
PER_SEED_COLUMNS = ("seed", "uncommitted", "env")
SUMMARY_COLUMNS = ["table", "seeds", "runs", "run_ids", "uncommitted_runs"]
UNCOMMITTED_MARK = "†"


def load_results(results_dir: str | Path) -> tuple[pd.DataFrame, list[SkippedRecord]]:
    """All valid records as a frame (one row per run), and the records skipped with their reasons."""
    frame, skipped, _ = load_runs(results_dir)
    return frame, skipped


def load_runs(
    results_dir: str | Path, renamed: Mapping[str, str] | None = None
) -> tuple[pd.DataFrame, list[SkippedRecord], dict[str, dict]]:
    """load_results, plus the records themselves by run id (the figures need their per-layer data).

    renamed maps a transform preset's former name to its present one (the preset's maps unchanged):
    records made under the former name read as the present one, and a configuration and seed recorded
    under both names count once, as the record under the present name.
    """
    renamed = dict(renamed or {})
    rows, skipped, records, former = [], [], {}, set()
    for item in iter_records(results_dir):
        if isinstance(item, SkippedRecord):
            skipped.append(item)
            continue
        if item["transform"] in renamed:
            item = {**item, "transform": renamed[item["transform"]]}
            former.add(item["run_id"])
        rows.append(record_row(item))
        records[item["run_id"]] = item
    frame = pd.DataFrame(rows, columns=None if rows else RUN_COLUMNS)
    return _without_former_doubles(frame, former), skipped, records


def _without_former_doubles(frame: pd.DataFrame, former: set[str]) -> pd.DataFrame:
    if not former:
        return frame
    is_former = frame["run_id"].isin(former).to_numpy()
    keys = frame.set_index(["config_id", "seed"]).index
    doubled = is_former & keys.isin(keys[~is_former])
    return frame[~doubled].reset_index(drop=True)


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """Perplexities first, then tasks alphabetically, then the averages; only columns with a value."""
    identity = set(RUN_COLUMNS) | set(SUMMARY_COLUMNS)
    present = [c for c in frame.columns
               if c not in identity and not c.endswith("_std") and not c.startswith("delta_")
               and frame[c].notna().any()]
    ppl = sorted(c for c in present if c.startswith("ppl_"))
    tasks = sorted(c for c in present if not c.startswith("ppl_") and c not in AVERAGE_COLUMNS)
    return ppl + tasks + [c for c in AVERAGE_COLUMNS if c in present]


def lower_is_better(metric: str) -> bool:
    return metric.startswith("ppl_")


# --- runs -> one row per configuration -----------------------------------------------------------


def _rank(value: str, order: tuple[str, ...]) -> tuple[int, str]:
    return (order.index(value), "") if value in order else (len(order), value)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration, in table order: '<metric>' (mean over seeds), '<metric>_std',
    'delta_<metric>' (vs the table's full-precision reference), 'seeds', 'runs', 'run_ids', 'uncommitted_runs'
    (those of run_ids made with uncommitted code), 'table'."""
    if frame.empty:
        return pd.DataFrame(columns=[key for key in RUN_COLUMNS[1:] if key not in PER_SEED_COLUMNS] + SUMMARY_COLUMNS)
    metrics = metric_columns(frame)
    rows = []
    for _, runs in frame.groupby("config_id", sort=False):
        first = runs.iloc[0]
        values = runs[metrics].astype(float)
        row = {key: first[key] for key in RUN_COLUMNS[1:] if key not in PER_SEED_COLUMNS}
        row.update(values.mean().to_dict())
        row.update(values.std(ddof=1).add_suffix("_std").to_dict())
        row.update(seeds=runs["seed"].nunique(), runs=len(runs), run_ids=" ".join(sorted(runs["run_id"])),
                   uncommitted_runs=" ".join(sorted(runs.loc[runs["uncommitted"], "run_id"])))
        rows.append(row)
    rows.sort(key=_row_order)
    summary = pd.DataFrame(rows)
    summary["table"] = _table_labels(summary)
    deltas = {f"delta_{m}": [float("nan")] * len(summary) for m in metrics}
    for _, rows_of_table in summary.groupby("table", sort=False):
        references = rows_of_table[rows_of_table["fp_reference"]]
        if references.empty:
            continue
        reference = most_seeded(references)
        for metric in metrics:
            for index in rows_of_table.index:
                deltas[f"delta_{metric}"][index] = summary.at[index, metric] - reference[metric]
    return pd.concat([summary, pd.DataFrame(deltas, index=summary.index)], axis=1)


def most_seeded(rows: pd.DataFrame) -> pd.Series:
    """The configuration with the most seeds; on a tie, the first in table order."""
    return rows.sort_values("seeds", ascending=False, kind="stable").iloc[0]


def _row_order(row: Mapping[str, Any]) -> tuple:
    """Model, then setting; the full-precision reference first; formats, transforms, weight quantizers."""
    setting = sorted((k, _natural(v)) for k, v in row["config"].items() if k.startswith(SETTING_PREFIXES))
    return (row["model"], setting, not row["fp_reference"], _rank(row["quant"], QUANT_ORDER),
            _rank(row["transform"], TRANSFORM_ORDER), _rank(row["weight_quantizer"], WEIGHT_QUANTIZER_ORDER),
            canonical_json(row["config"]))


def _natural(text: str) -> tuple[int, float, str]:
    """Numbers in numeric order (128 before 1024), before text."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def _table_labels(summary: pd.DataFrame) -> list[str]:
    """'tab:tiny', or 'tab:tiny-1', 'tab:tiny-2' when a model was evaluated in several settings."""
    labels, seen = [], {}
    for model, setting in zip(summary["model"], summary["setting_id"], strict=True):
        settings = seen.setdefault(model, [])
        if setting not in settings:
            settings.append(setting)
    for model, setting in zip(summary["model"], summary["setting_id"], strict=True):
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", model).strip("-")
        several = len(seen[model]) > 1
        labels.append(f"tab:{slug}-{seen[model].index(setting) + 1}" if several else f"tab:{slug}")
    return labels


# --- configurations -> tables --------------------------------------------------------------------


@dataclass
class Table:
    label: str  # 'tab:tiny'; also names the table's figure
    model: str
    setting: dict[str, str]  # the model.* and eval.* keys this table was run with
    split_by: dict[str, str]  # those of them that differ between this model's tables
    rows: pd.DataFrame  # the summary rows, in order
    varying: list[str]  # config keys shown as columns: they differ between rows
    metrics: list[str]

    @property
    def heading(self) -> str:
        details = ", ".join(f"{short_name(k)} {v}" for k, v in self.split_by.items())
        return f"{self.model} ({details})" if details else self.model

    @property
    def notes(self) -> str:
        """What the table shows, under its heading (markdown) or in its caption (LaTeX)."""
        shown = [key for key in ("eval.suite", "eval.max_seq_len") if key in self.setting and key not in self.split_by]
        evaluation = ", ".join(f"{short_name(key)} {self.setting[key]}" for key in shown)
        uncommitted = (f" {UNCOMMITTED_MARK}: made with uncommitted code changes (the records' git_uncommitted), "
                       "so not reproducible from their git_sha alone; uncommitted_runs in the CSV names the runs."
                       if self.rows["uncommitted_runs"].astype(bool).any() else "")
        return ((f"Evaluation: {evaluation}. " if evaluation else "")
                + "Mean ± std over seeds; Δ vs full precision (quant none, identity transform); best per format "
                "in bold (lowest perplexity, highest accuracy); accuracy in percent." + uncommitted)

    @property
    def caption(self) -> str:
        return f"{self.heading}. {self.notes}"


def short_name(key: str) -> str:
    """'transform.placements.residual.parametrization' -> 'residual param'; 'eval.max_seq_len' -> 'seq len'."""
    parts = key.split(".")
    if parts[:2] == ["transform", "placements"]:
        parts = parts[2:]
    elif parts[0] in ("eval", "quant", "model") and len(parts) > 1:
        parts = parts[1:]
    return " ".join(SHORT_WORDS.get(part, part) for part in parts)


def varying_keys(rows: pd.DataFrame) -> list[str]:
    """Config keys whose shown values differ between rows, except the ones the quant/method labels tell.

    A row takes part only with the keys that apply to it (`applies`): the full-precision reference with
    the keys that can change its numbers, a run that learned nothing without the learning settings.
    """
    records = rows.to_dict("records")
    keys = sorted({key for row in records for key in row["config"]})
    shown = []
    for key in keys:
        values = {}
        for row in records:
            if applies(key, row):
                values.setdefault((row["quant"], row["method"]), set()).add(shown_value(key, row, missing=None))
        distinct = set().union(*values.values()) if values else set()
        if len(distinct) <= 1:
            continue
        if key.startswith(LABEL_PREFIXES) and all(len(v) == 1 for v in values.values()):
            continue  # the quant or method label tells it
        shown.append(key)
    return shown


def build_tables(summary: pd.DataFrame) -> list[Table]:
    """The summary cut into tables, one per model and evaluation setting, in summary order."""
    metrics = metric_columns(summary)
    tables = []
    settings_of: dict[str, list[dict[str, str]]] = {}
    for _, rows in summary.groupby("table", sort=False):
        config = rows.iloc[0]["config"]
        settings_of.setdefault(rows.iloc[0]["model"], []).append(
            {k: v for k, v in config.items() if k.startswith(SETTING_PREFIXES)})
    for label, rows in summary.groupby("table", sort=False):
        model = rows.iloc[0]["model"]
        setting = {k: v for k, v in rows.iloc[0]["config"].items() if k.startswith(SETTING_PREFIXES)}
        siblings = settings_of[model]
        split_by = {k: v for k, v in setting.items() if len({s.get(k) for s in siblings}) > 1}
        present = [m for m in metrics if rows[m].notna().any()]
        tables.append(Table(str(label), model, setting, split_by, rows, varying_keys(rows), present))
    return tables


# --- rendering -----------------------------------------------------------------------------------


def _shown_metrics(metrics: list[str]) -> list[tuple[str, bool]]:
    """(metric, with a Δ column): perplexities and averages get one; the CSV has every delta."""
    return [(m, m.startswith("ppl_") or m in AVERAGE_COLUMNS) for m in metrics]


def _best(table: Table) -> set[tuple[int, str]]:
    """(row index, metric) of the best value per format among the quantized rows (ties all marked)."""
    best = set()
    candidates = table.rows[~table.rows["fp_reference"]]
    for _, block in candidates.groupby("quant", sort=False):
        for metric in table.metrics:
            values = block[metric].dropna().round(2)
            if len(values) < 2 or values.nunique() < 2:
                continue
            target = values.min() if lower_is_better(metric) else values.max()
            best |= {(index, metric) for index in values.index[values == target]}
    return best


def _cells(table: Table, latex: bool) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, body rows and column alignment of one table; model/quant not repeated."""
    pm = " $\\pm$ " if latex else " ± "
    missing = "--" if latex else "–"
    text = _latex_escape if latex else str
    header = ["quant", "method", *(text(short_name(k)) for k in table.varying), "seeds"]
    align = ["left", "left", *("left" for _ in table.varying), "right"]
    for metric, delta in _shown_metrics(table.metrics):
        name = text(DISPLAY_NAMES.get(metric, metric))
        header.append(name)
        align.append("right")
        if delta:
            header.append(f"Δ {name.removesuffix(' ppl')}" if not latex else f"$\\Delta$ {name.removesuffix(' ppl')}")
            align.append("right")
    best = _best(table)
    body, previous_quant = [], None
    for index, row in table.rows.iterrows():
        quant = "" if row["quant"] == previous_quant else row["quant"]
        previous_quant = row["quant"]
        mark = (("$^\\dagger$" if latex else f" {UNCOMMITTED_MARK}") if row["uncommitted_runs"] else "")
        cells = [text(quant), text(row["method"]) + mark]
        cells += [text(shown_value(k, row, missing)) for k in table.varying]
        cells.append(str(row["seeds"]))
        for metric, delta in _shown_metrics(table.metrics):
            mean, std = row[metric], row[f"{metric}_std"]
            if pd.isna(mean):
                cell = missing
            else:
                cell = f"{mean:.2f}{pm}{std:.2f}" if row["seeds"] > 1 and not pd.isna(std) else f"{mean:.2f}"
                if (index, metric) in best:
                    cell = f"\\textbf{{{cell}}}" if latex else f"**{cell}**"
            cells.append(cell)
            if delta:
                value = row[f"delta_{metric}"]
                cells.append("" if row["fp_reference"] or pd.isna(value) else
                             (f"${value:+.2f}$" if latex else f"{value:+.2f}"))
        body.append(cells)
    return header, body, align


def table_markdown(table: Table) -> str:
    header, body, align = _cells(table, latex=False)
    frame = pd.DataFrame(body, columns=header)
    rendered = frame.to_markdown(index=False, disable_numparse=True, colalign=align)
    return f"## {table.heading}\n\n{table.notes}\n\n{rendered}\n"


def table_latex(table: Table) -> str:
    header, body, align = _cells(table, latex=True)
    spec = "".join("l" if a == "left" else "r" for a in align)
    caption = (_latex_escape(table.caption).replace("±", "$\\pm$").replace("Δ", "$\\Delta$")
               .replace(UNCOMMITTED_MARK, "$^\\dagger$"))
    lines = [
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        f"\\caption{{{caption}}}",
        f"\\label{{{table.label}}}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(header) + " \\\\",
    ]
    quants = list(table.rows["quant"])
    for position, cells in enumerate(body):
        if cells[0]:  # first row of a format: a rule, and the format spans its rows
            span = 1
            while position + span < len(quants) and quants[position + span] == quants[position]:
                span += 1
            lines.append("\\midrule")
            if span > 1:
                cells = [f"\\multirow{{{span}}}{{*}}{{{cells[0]}}}", *cells[1:]]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(lines)


LATEX_SPECIALS = {"\\": r"\textbackslash{}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  **{c: "\\" + c for c in "&%$#_{}"}}


def _latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(c, c) for c in str(text))


def tables_markdown(tables: list[Table]) -> str:
    if not tables:
        return "# Results\n\nNo result records.\n"
    return "# Results\n\n" + "\n".join(table_markdown(t) for t in tables)


def tables_latex(tables: list[Table]) -> str:
    preamble = "% generated by scripts/make_tables.py; needs \\usepackage{booktabs} and \\usepackage{multirow}\n\n"
    return preamble + "\n".join(table_latex(t) for t in tables)


def tables_csv(tables: list[Table]) -> pd.DataFrame:
    """The numbers: one row per configuration, the table it is in, the config keys that differ there."""
    if not tables:
        return pd.DataFrame(columns=["table", "model", "quant", "method", "seeds"])
    parts = []
    for table in tables:
        rows = table.rows.drop(columns=["config", "setting_id", "transform", "weight_quantizer"])
        rows = rows.assign(**{key: [shown_value(key, row, missing=None) or None for row in table.rows.to_dict("records")]
                              for key in table.varying})
        parts.append(rows)
    frame = pd.concat(parts, ignore_index=True)
    metrics = list(dict.fromkeys(m for table in tables for m in metric_columns(table.rows)))
    first = ["table", "model", "quant", "method", "fp_reference"]
    varying = list(dict.fromkeys(key for table in tables for key in table.varying))
    numbers = [col for m in metrics for col in (m, f"{m}_std", f"delta_{m}")]
    return frame[first + varying + ["seeds", "runs", *numbers, "config_id", "run_ids", "uncommitted_runs"]]


def write_tables(summary: pd.DataFrame, out_dir: str | Path, name: str = "results") -> dict[str, Path]:
    """<name>.md (markdown), <name>.tex (LaTeX) and <name>.csv (numbers: means, stds, deltas, seeds)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = build_tables(summary)
    paths = {fmt: out_dir / f"{name}.{fmt}" for fmt in ("md", "tex", "csv")}
    paths["md"].write_text(tables_markdown(tables))
    paths["tex"].write_text(tables_latex(tables))
    tables_csv(tables).to_csv(paths["csv"], index=False, float_format="%.6g")
    return paths


# --- ours vs published ---------------------------------------------------------------------------


def load_reference(path: str | Path) -> pd.DataFrame:
    reference = pd.read_csv(path, dtype=str, keep_default_na=False)
    required = {"model_key", "quant_key", "method_key", "metric_key", "value", "source_id"}
    missing = required - set(reference.columns)
    if missing:
        raise ValueError(f"{path} lacks column(s) {', '.join(sorted(missing))}; see results/reference/README.md")
    return reference


COMPARISON_COLUMNS = ["model", "quant", "method", "table", "metric", "ours", "published", "delta",
                      "published_format", "source"]


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
                "model": ours["model"], "quant": ours["quant"], "method": ours["method"],
                "table": ours.get("table", ""), "metric": metric, "ours": ours[column],
                "published": published["published"], "delta": ours[column] - published["published"],
                "published_format": published["quant_key"], "source": published["source_id"],
            })
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def _listed(values: Iterable[str]) -> str:
    values = sorted({v for v in values if v})
    return ", ".join(values) if values else "nothing"


def explain_no_match(summary: pd.DataFrame, reference: pd.DataFrame, match_format: bool = True) -> str:
    """Why no published number lines up with ours: which models, formats, methods or metrics differ."""
    if summary.empty:
        return "There are no result records to compare."
    ref = reference[pd.to_numeric(reference["value"], errors="coerce").notna()]
    ours_models, ref_models = set(summary["model"]), set(ref["model_key"])
    if not ours_models & ref_models:
        return (f"No model in common: ours {_listed(ours_models)}; the published rows are for "
                f"{_listed(ref_models)} (`model_key` in the reference CSV).")
    reasons = []
    for model in sorted(ours_models & ref_models):
        mine, theirs = summary[summary["model"] == model], ref[ref["model_key"] == model]
        if match_format and not set(mine["quant"]) & set(theirs["quant_key"]):
            reasons.append(f"{model}: our formats {_listed(mine['quant'])}, published {_listed(theirs['quant_key'])} "
                           "(`--any-format` compares across formats)")
            continue
        pairs = set(zip(mine["quant"], mine["method"], strict=True))
        their_pairs = set(zip(theirs["quant_key"], theirs["method_key"], strict=True))
        common = {(q, m) for q, m in pairs if any(m == tm and (q == tq or not match_format) for tq, tm in their_pairs)}
        if not common:
            reasons.append(f"{model}: our methods {_listed(m for _, m in pairs)}, published "
                           f"{_listed(m for _, m in their_pairs)}")
            continue
        ours_metrics = {m.removeprefix("ppl_") for m in metric_columns(mine)}
        reasons.append(f"{model}: our metrics {_listed(ours_metrics)}, published {_listed(theirs['metric_key'])}")
    return "Nothing matches a published number.\n\n" + "\n".join(f"- {r}" for r in reasons)


def comparison_markdown(comparison: pd.DataFrame, summary: pd.DataFrame, reference: pd.DataFrame,
                        match_format: bool = True) -> str:
    title = "# Ours vs published\n\n"
    if comparison.empty:
        return title + explain_no_match(summary, reference, match_format) + "\n"
    scope = "the same model, format, method and metric" if match_format else \
        "the same model, method and metric, any format (published_format says which)"
    note = f"Published rows of {scope}; delta = ours - published.\n\n"
    return title + note + comparison.to_markdown(index=False, floatfmt=".2f") + "\n"
