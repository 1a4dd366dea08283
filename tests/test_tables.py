"""Paper tables from result records: one row per configuration (mean ± std over its seeds), one table
per model and evaluation setting, full precision first, deltas, best in bold, ours vs published."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_record import make_record

from latmix import figures, record, report, tables

ROOT = Path(__file__).resolve().parent.parent

# A resolved config as run.py records it (trimmed): `${seed}` already substituted in calib and transform.
BASE_CONFIG = {
    "seed": 0, "device": "auto", "force": False,
    "paths": {"results_dir": "results", "output_dir": "outputs"},
    "model": {"name": "tiny", "name_or_path": "models/tiny-llama", "dtype": "float32", "outliers": None},
    "quant": {"name": "mxfp4", "weight_format": "mxfp4", "act_format": "mxfp4", "block_size": 32,
              "weight_quantizer": "gptq", "kv_format": None, "layers": "decoder"},
    "calib": {"mode": "end_to_end", "objective": "kl", "n_samples": 16, "seq_len": 256, "seed": 0,
              "offload": False, "checkpoint_every": 50},
    "optim": {"name": "adamw", "lr": 0.001},
    "transform": {"name": "affine", "placements": {"residual": {"family": "affine", "parametrization": "qr"}},
                  "approximate": True, "seed": 0},
    "eval": {"suite": "local", "tasks": None, "ppl_datasets": ["heldout"], "max_seq_len": 2048,
             "batch_size": 8, "limit": 50},
    "logger": {"backend": "wandb", "mode": "offline"},
}
FULL_PRECISION = {"name": "none", "weight_format": None, "act_format": None, "block_size": None,
                  "weight_quantizer": "rtn", "kv_format": None, "layers": "decoder"}


def set_key(config: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[leaf] = value


def write_run(results_dir: Path, transform: str = "affine", seed: int = 0, heldout: float = 10.0,
              piqa: float = 0.70, quant: str = "mxfp4", wq: str = "gptq", uncommitted: list[str] | None = None,
              learned: bool = True, env: dict | None = None, **overrides) -> dict:
    """One record of `transform` in `quant` (none = full precision); overrides: {'eval.max_seq_len': 128};
    uncommitted: the code files the run's checkout had changed (its git_uncommitted); learned=False: its
    calibration was skipped (nothing to learn); env: settings of where it ran, over the record's own."""
    config = copy.deepcopy(BASE_CONFIG)
    config["seed"] = config["calib"]["seed"] = config["transform"]["seed"] = seed
    config["transform"]["name"] = transform
    if transform != "affine":
        config["transform"]["placements"] = {} if transform == "identity" else {"residual": {"family": transform}}
    if quant == "none":
        config["quant"] = dict(FULL_PRECISION)
    else:
        config["quant"].update(name=quant, weight_format=quant, act_format=quant, weight_quantizer=wq)
    for dotted, value in overrides.items():
        set_key(config, dotted.replace("__", "."), value)
    rec = make_record(run_id=record.run_id(config), config=config, transform=transform, seed=seed, quant=quant,
                      weight_quantizer=config["quant"]["weight_quantizer"])
    rec["metrics"]["ppl"] = {"heldout": heldout}
    rec["metrics"]["tasks"] = {"piqa": {"acc": piqa - 0.01, "acc_norm": piqa}}
    rec["metrics"]["averages"] = {"avg6": None, "avg8": None, "mean": piqa}
    if uncommitted is not None:
        rec["git_uncommitted"] = uncommitted
    if not learned:
        rec["calibration"]["skipped"] = "no learnable parameter (every transform is fixed)"
    rec["env"].update(env or {})
    record.write_record(record.record_path(results_dir, rec["run_id"]), rec)
    return rec


def summary_of(results_dir: Path) -> pd.DataFrame:
    frame, skipped = tables.load_results(results_dir)
    assert skipped == []
    return tables.summarize(frame)


def only_table(results_dir: Path) -> tables.Table:
    built = tables.build_tables(summary_of(results_dir))
    assert len(built) == 1
    return built[0]


# --- grouping: one row per configuration, never averaged across configurations ---------------------


def test_seeds_of_one_configuration_fold_into_one_row_with_mean_std_and_seed_count(tmp_path):
    write_run(tmp_path, "affine", seed=0, heldout=10.0, piqa=0.70)
    write_run(tmp_path, "affine", seed=1, heldout=12.0, piqa=0.72)
    summary = summary_of(tmp_path)
    assert len(summary) == 1
    affine = summary.iloc[0]
    assert affine["method"] == "affine+gptq" and affine["seeds"] == 2
    assert affine["ppl_heldout"] == pytest.approx(11.0)
    assert affine["ppl_heldout_std"] == pytest.approx(2**0.5)
    assert affine["piqa"] == pytest.approx(71.0)  # acc_norm, in percent


@pytest.mark.parametrize(
    ("key", "values"),
    [
        ("eval.max_seq_len", (128, 256)),
        ("calib.n_samples", (16, 128)),
        ("optim.lr", (0.001, 0.01)),
        ("transform.placements.residual.parametrization", ("qr", "lu")),
        ("calib.seed", (7, 8)),  # a fixed calibration seed is part of the configuration
    ],
)
def test_runs_that_differ_in_one_key_are_two_rows(tmp_path, key, values):
    for value, heldout in zip(values, (173.92, 181.16), strict=True):
        write_run(tmp_path, "affine", seed=0, heldout=heldout, **{key: value})
    summary = summary_of(tmp_path)
    assert sorted(summary["ppl_heldout"]) == [173.92, 181.16]
    assert list(summary["seeds"]) == [1, 1]


def test_a_float_setting_spelled_as_a_whole_number_does_not_split_a_configuration(tmp_path):
    write_run(tmp_path, "affine", seed=0, heldout=10.0, **{"calib.reg_weight": 0})
    write_run(tmp_path, "affine", seed=1, heldout=12.0, **{"calib.reg_weight": 0.0})
    assert list(summary_of(tmp_path)["seeds"]) == [2]


def test_a_setting_added_later_does_not_split_a_configuration_at_its_implicit_earlier_value(tmp_path):
    write_run(tmp_path, "affine", seed=0, heldout=10.0)  # recorded before optim.clip_lr existed
    write_run(tmp_path, "affine", seed=1, heldout=12.0, **{"optim.clip_lr": None})
    write_run(tmp_path, "affine", seed=0, heldout=14.0, **{"optim.clip_lr": 0.5})
    assert sorted(summary_of(tmp_path)["seeds"]) == [1, 2]


def test_where_and_how_keys_and_the_run_seed_do_not_split_a_configuration(tmp_path):
    write_run(tmp_path, "affine", seed=0, heldout=10.0, **{"paths.results_dir": "/a", "device": "cuda"})
    write_run(tmp_path, "affine", seed=1, heldout=12.0, **{"logger.mode": "disabled", "calib.offload": True})
    assert list(summary_of(tmp_path)["seeds"]) == [2]


def test_an_evaluation_setting_gets_its_own_table_named_by_what_differs(tmp_path):
    for seq_len in (128, 256):
        write_run(tmp_path, "identity", quant="none", heldout=9.0, **{"eval.max_seq_len": seq_len})
        write_run(tmp_path, "affine", heldout=10.0, **{"eval.max_seq_len": seq_len})
    built = tables.build_tables(summary_of(tmp_path))
    assert [t.heading for t in built] == ["tiny (seq len 128)", "tiny (seq len 256)"]
    assert [t.label for t in built] == ["tab:tiny-1", "tab:tiny-2"]
    assert all(len(t.rows) == 2 for t in built)


def test_a_key_that_differs_within_a_table_is_shown_as_a_column(tmp_path):
    for parametrization, heldout in (("qr", 10.0), ("lu", 11.0)):
        write_run(tmp_path, "affine", heldout=heldout, **{"transform.placements.residual.parametrization":
                                                          parametrization})
    write_run(tmp_path, "hadamard", heldout=12.0)
    table = only_table(tmp_path)
    assert table.varying == ["transform.placements.residual.parametrization"]
    md = tables.table_markdown(table)
    assert "residual param" in md
    assert md.count("| affine+gptq") == 2


def test_keys_the_method_label_tells_are_not_repeated_as_columns(tmp_path):
    write_run(tmp_path, "affine", heldout=10.0)
    write_run(tmp_path, "hadamard", heldout=12.0)
    write_run(tmp_path, "hadamard", heldout=13.0, wq="rtn")
    assert only_table(tmp_path).varying == []


def test_the_full_precision_reference_ignores_calibration_settings_it_never_used(tmp_path):
    write_run(tmp_path, "identity", quant="none", seed=0, heldout=9.0, **{"calib.n_samples": 16})
    write_run(tmp_path, "identity", quant="none", seed=1, heldout=9.2, **{"calib.n_samples": 128})
    write_run(tmp_path, "affine", heldout=10.0, **{"calib.n_samples": 128})
    table = only_table(tmp_path)
    assert list(table.rows["seeds"]) == [2, 1] and table.varying == []


def test_a_run_that_learned_nothing_reads_calib_mode_none_and_has_no_learning_settings(tmp_path):
    # block_hadamard keeps the default calib.mode end_to_end, but has nothing to learn: the table must not
    # suggest it was trained, nor show the optimizer it never used
    write_run(tmp_path, "block_hadamard", heldout=12.0, learned=False, **{"optim.lr": 0.001})
    write_run(tmp_path, "rotation", heldout=11.0, **{"optim.lr": 1.5})
    write_run(tmp_path, "affine", heldout=10.0, **{"calib.mode": "none", "optim.lr": 0.001}, learned=False)
    table = only_table(tmp_path)
    assert table.varying == ["calib.mode"]  # optim.lr differs only between runs that never used it
    header, body, _ = tables._cells(table, latex=False)
    modes = {row[1]: row[header.index("calib mode")] for row in body}
    assert modes == {"block_hadamard+gptq": "none", "rotation+gptq": "end_to_end", "affine+gptq": "none"}


def test_learning_settings_of_learned_runs_are_columns_blank_for_runs_that_learned_nothing(tmp_path):
    write_run(tmp_path, "identity", heldout=12.0, learned=False)
    write_run(tmp_path, "rotation", heldout=11.0, **{"optim.lr": 1.5})
    write_run(tmp_path, "affine", heldout=10.0, **{"optim.lr": 0.01})
    table = only_table(tmp_path)
    assert table.varying == ["calib.mode", "optim.lr"]
    header, body, _ = tables._cells(table, latex=False)
    assert [row[header.index("calib mode")] for row in body] == ["none", "end_to_end", "end_to_end"]
    assert [row[header.index("optim lr")] for row in body] == ["", "1.5", "0.01"]
    csv = tables.tables_csv([table])
    assert csv["optim.lr"].isna().tolist() == [True, False, False]
    labels = [figures.row_label(row, table.varying) for row in table.rows.to_dict("records")]
    assert labels == ["mxfp4 · identity+gptq · calib mode none", "mxfp4 · rotation+gptq · calib mode end_to_end · optim lr 1.5",
                      "mxfp4 · affine+gptq · calib mode end_to_end · optim lr 0.01"]


# --- layout: full precision first, deltas, bold best -----------------------------------------------


def fp_and_methods(results_dir: Path) -> None:
    write_run(results_dir, "rotation", seed=0, heldout=14.0, piqa=0.60)
    write_run(results_dir, "affine", seed=0, heldout=11.0, piqa=0.66)
    write_run(results_dir, "affine", seed=1, heldout=13.0, piqa=0.68)
    write_run(results_dir, "identity", seed=0, heldout=20.0, piqa=0.55, wq="rtn")
    write_run(results_dir, "identity", quant="none", heldout=9.0, piqa=0.70)


def test_full_precision_comes_first_then_formats_then_methods_least_to_most_expressive(tmp_path):
    fp_and_methods(tmp_path)
    rows = only_table(tmp_path).rows
    assert list(rows["method"]) == ["identity", "identity+rtn", "rotation+gptq", "affine+gptq"]
    assert list(rows["fp_reference"]) == [True, False, False, False]


def test_deltas_are_against_the_full_precision_row_of_the_same_model_and_evaluation(tmp_path):
    fp_and_methods(tmp_path)
    write_run(tmp_path, "identity", quant="none", heldout=50.0, **{"eval.limit": 10})  # another evaluation
    summary = summary_of(tmp_path).set_index("method")
    affine = summary.loc["affine+gptq"]
    assert affine["delta_ppl_heldout"] == pytest.approx(12.0 - 9.0)
    assert affine["delta_piqa"] == pytest.approx(67.0 - 70.0)
    assert affine["delta_avg"] == pytest.approx(67.0 - 70.0)


def test_deltas_are_empty_without_a_full_precision_record(tmp_path):
    write_run(tmp_path, "affine", heldout=10.0)
    assert summary_of(tmp_path)["delta_ppl_heldout"].isna().all()


def test_markdown_shows_mean_std_seeds_deltas_and_the_best_in_bold_without_repeating_the_format(tmp_path):
    fp_and_methods(tmp_path)
    md = tables.table_markdown(only_table(tmp_path))
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header, body = [c.strip() for c in lines[0].strip("|").split("|")], lines[2:]
    assert header[:3] == ["quant", "method", "seeds"] and "Δ heldout" in header and "Δ avg (all)" in header
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in body]
    assert [row[0] for row in cells] == ["none", "mxfp4", "", ""]  # each format named once
    affine = dict(zip(header, cells[3], strict=True))
    assert affine["heldout ppl"] == "**12.00 ± 1.41**"  # lowest perplexity among the MXFP4 rows
    assert affine["piqa"] == "**67.00 ± 1.41**"  # best among MXFP4: full precision (70) does not compete
    assert affine["Δ heldout"] == "+3.00" and affine["seeds"] == "2"
    rotation = dict(zip(header, cells[2], strict=True))
    assert rotation["heldout ppl"] == "14.00" and rotation["piqa"] == "60.00"
    assert dict(zip(header, cells[0], strict=True))["Δ heldout"] == ""  # the reference has no delta


def test_best_accuracy_is_the_highest_and_ties_are_all_bold(tmp_path):
    write_run(tmp_path, "rotation", heldout=14.0, piqa=0.66)
    write_run(tmp_path, "affine", heldout=14.0, piqa=0.60)
    table = only_table(tmp_path)
    md = tables.table_markdown(table)
    assert "**66.00**" in md and "**60.00**" not in md
    assert md.count("**14.00**") == 0  # a tie between every row marks nothing


def test_latex_uses_booktabs_pm_caption_label_multirow_and_textbf(tmp_path):
    fp_and_methods(tmp_path)
    tex = tables.table_latex(only_table(tmp_path))
    for part in ("\\toprule", "\\midrule", "\\bottomrule", "\\caption{", "\\label{tab:tiny}",
                 "$\\pm$", "\\multirow{3}{*}{mxfp4}", "\\textbf{12.00 $\\pm$ 1.41}", "affine+gptq"):
        assert part in tex, part
    assert "±" not in tex and "Δ" not in tex
    assert "identity+rtn" in tex and "heldout ppl" in tex
    assert tex.count("mxfp4") == 1  # the format once, spanning its rows


def test_latex_escapes_underscores_in_names(tmp_path):
    write_run(tmp_path, "block_hadamard", heldout=10.0)
    assert "block\\_hadamard+gptq" in tables.table_latex(only_table(tmp_path))


def test_tables_are_written_as_markdown_latex_and_csv_with_numbers(tmp_path):
    fp_and_methods(tmp_path)
    paths, messages = report.regenerate(tmp_path, tmp_path / "tables", reference=None)
    assert messages == []
    assert "## tiny" in paths["md"].read_text()
    assert paths["tex"].read_text().count("\\begin{tabular}") == 1
    csv = pd.read_csv(paths["csv"]).set_index("method")
    assert csv.loc["affine+gptq", "ppl_heldout"] == 12.0
    assert csv.loc["affine+gptq", "ppl_heldout_std"] == pytest.approx(2**0.5, rel=1e-5)
    assert csv.loc["affine+gptq", "delta_ppl_heldout"] == 3.0
    assert csv.loc["affine+gptq", "seeds"] == 2
    assert list(csv["table"].unique()) == ["tab:tiny"]


def test_the_csv_carries_the_keys_that_differ_within_a_table(tmp_path):
    write_run(tmp_path, "affine", heldout=10.0, **{"optim.lr": 0.01})
    write_run(tmp_path, "affine", heldout=11.0, **{"optim.lr": 0.001})
    paths, _ = report.regenerate(tmp_path, tmp_path / "tables")
    assert sorted(pd.read_csv(paths["csv"])["optim.lr"]) == [0.001, 0.01]


def test_a_corrupted_record_is_reported_and_the_rest_still_tabulated(tmp_path):
    write_run(tmp_path, "affine", heldout=10.0)
    (tmp_path / "runs" / "broken.json").write_text("{not json")
    paths, messages = report.regenerate(tmp_path, tmp_path / "tables")
    assert len(messages) == 1 and "broken.json" in messages[0]
    assert len(pd.read_csv(paths["csv"])) == 1


def test_a_row_with_a_seed_run_on_uncommitted_code_is_marked_and_its_runs_named(tmp_path):
    dirty = write_run(tmp_path, "affine", seed=0, heldout=10.0, uncommitted=["latmix/mx.py"])
    write_run(tmp_path, "affine", seed=1, heldout=12.0, uncommitted=[])  # a clean checkout: [] is not a mark
    write_run(tmp_path, "rotation", seed=0, heldout=14.0)  # older records carry no field at all

    paths, messages = report.regenerate(tmp_path, tmp_path / "tables")

    assert messages == [f"1 run(s) made with uncommitted code changes (marked † in the tables; not reproducible "
                        f"from their git_sha alone): {dirty['run_id']}"]
    md = paths["md"].read_text()
    assert "affine+gptq †" in md and "rotation+gptq †" not in md
    assert "†: made with uncommitted code changes" in md
    assert "affine+gptq$^\\dagger$" in paths["tex"].read_text() and "†" not in paths["tex"].read_text()
    csv = pd.read_csv(paths["csv"], keep_default_na=False).set_index("method")
    assert csv.loc["affine+gptq", "uncommitted_runs"] == dirty["run_id"]
    assert csv.loc["rotation+gptq", "uncommitted_runs"] == ""


def test_a_row_whose_seeds_ran_at_different_thread_counts_is_named(tmp_path):
    write_run(tmp_path, "affine", seed=0, heldout=10.0, env={"threads": 1, "cpu": "Xeon"})
    write_run(tmp_path, "affine", seed=1, heldout=12.0, env={"threads": 2, "cpu": "Xeon"})
    write_run(tmp_path, "hadamard", seed=0, heldout=14.0, env={"threads": 1})
    write_run(tmp_path, "hadamard", seed=1, heldout=14.0)  # a record without the setting is not compared

    _, messages = report.regenerate(tmp_path, tmp_path / "tables")

    assert len(messages) == 1
    assert messages[0].startswith("1 configuration(s) average seeds run in different environments")
    assert "affine+gptq at mxfp4 on tiny" in messages[0] and messages[0].endswith(": threads 1, 2)")


def test_a_table_of_committed_runs_says_nothing_of_uncommitted_code(tmp_path):
    fp_and_methods(tmp_path)
    md = tables.table_markdown(only_table(tmp_path))
    assert "†" not in md and "uncommitted" not in md


def test_full_precision_rows_are_labelled_by_transform_only():
    rec = make_record(config={"quant": {"weight_format": None}}, quant="none", transform="identity")
    assert tables.record_row(rec)["method"] == "identity"


def test_no_records_give_a_table_that_says_so(tmp_path):
    paths, messages = report.regenerate(tmp_path, tmp_path / "tables", figures=True)
    assert "No result records" in paths["md"].read_text() and messages == []


# --- ours vs published -----------------------------------------------------------------------------


REFERENCE = pd.DataFrame(
    [
        {"model_key": "llama3-8b", "quant_key": "int4", "method_key": "hadamard+gptq",
         "metric_key": "wikitext2", "value": "8.16", "source_id": "flatquant_readme"},
        {"model_key": "llama3-8b", "quant_key": "mxfp4", "method_key": "hadamard+gptq",
         "metric_key": "wikitext2", "value": "7.9", "source_id": "other"},
    ]
)


def test_ours_beside_published_with_the_delta():
    summary = pd.DataFrame(
        [{"model": "llama3-8b", "quant": "int4", "method": "hadamard+gptq", "ppl_wikitext2": 8.5,
          "ppl_wikitext2_std": float("nan"), "seeds": 1}]
    )
    same_format = tables.compare_with_reference(summary, REFERENCE)
    assert same_format[["published", "delta", "source"]].to_dict("records") == [
        {"published": 8.16, "delta": pytest.approx(0.34), "source": "flatquant_readme"}
    ]
    assert len(tables.compare_with_reference(summary, REFERENCE, match_format=False)) == 2


def test_when_nothing_matches_the_comparison_says_which_models_we_have_and_the_reference_has(tmp_path):
    write_run(tmp_path, "hadamard", heldout=10.0)
    REFERENCE.to_csv(tmp_path / "published.csv", index=False)
    paths, messages = report.regenerate(tmp_path, tmp_path / "tables", reference=tmp_path / "published.csv")
    text = paths["vs_published"].read_text()
    assert "Nothing matches" in text or "No model in common" in text
    assert "ours tiny" in text and "llama3-8b" in text
    assert "|" not in text  # no empty table
    assert any("vs_published" in m for m in messages)


def test_when_the_model_matches_but_not_the_format_the_comparison_names_both_formats():
    summary = pd.DataFrame([{"model": "llama3-8b", "quant": "nvfp4", "method": "hadamard+gptq",
                             "ppl_wikitext2": 8.5}])
    why = tables.explain_no_match(summary, REFERENCE)
    assert "llama3-8b: our formats nvfp4, published int4, mxfp4" in why and "--any-format" in why


def test_the_shipped_reference_csv_has_the_mapping_columns():
    reference = tables.load_reference(ROOT / "results" / "reference" / "published.csv")
    assert {"flatquant_readme", "spinquant_readme", "quarot_paper_t12", "mrgptq_t1"} <= set(reference["source_id"])
    assert (reference["paper"] != "").all() and (reference["url"] != "").all()
    llama3 = reference[(reference["model_key"] == "llama3-8b") & (reference["metric_key"] == "wikitext2")]
    assert set(llama3["method_key"]) >= {"hadamard+gptq", "rotation+gptq", "flatquant+gptq"}


# --- the script --------------------------------------------------------------------------------------


def test_make_tables_script_prints_skips_and_writes_tables_and_figures(tmp_path):
    fp_and_methods(tmp_path)
    (tmp_path / "runs" / "broken.json").write_text("[]")
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tables.py"), "--results-dir", str(tmp_path),
         "--out", str(tmp_path / "tables")],
        capture_output=True, text=True, check=True, timeout=120,
    )
    assert "broken.json" in out.stderr
    assert "affine+gptq" in out.stdout
    assert (tmp_path / "tables" / "results.md").exists()
    for fmt in ("png", "pdf"):
        assert (tmp_path / "tables" / "figures" / f"tiny_metrics.{fmt}").stat().st_size > 0


RUNNER = """
import runpy, sys
sys.argv = ["make_tables.py", *sys.argv[1:]]
try:
    runpy.run_path(%r, run_name="__main__")
finally:
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "lm_eval"))
    print("HEAVY:" + ",".join(heavy), file=sys.stderr)
"""


def test_make_tables_imports_no_torch(tmp_path):
    fp_and_methods(tmp_path)
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", RUNNER % str(ROOT / "scripts" / "make_tables.py"), "--results-dir", str(tmp_path),
         "--out", str(tmp_path / "tables")],
        capture_output=True, text=True, check=True, timeout=120,
    )
    heavy = out.stderr.rsplit("HEAVY:", 1)[1].strip()
    assert heavy == "", f"make_tables imported {heavy} ({time.perf_counter() - start:.1f} s)"


def test_records_of_a_renamed_preset_read_under_its_present_name_and_count_once(tmp_path):
    same_maps = {"transform.placements": copy.deepcopy(BASE_CONFIG["transform"]["placements"])}
    write_run(tmp_path, "latmix", seed=0, heldout=10.0, **same_maps)  # recorded again under the new name
    write_run(tmp_path, "latmix", seed=1, heldout=12.0, **same_maps)  # only under the old name
    write_run(tmp_path, "latmix", seed=0, heldout=9.0, **same_maps, **{"calib.epochs": 5})
    write_run(tmp_path, "affine", seed=0, heldout=10.0)

    frame, _, records = tables.load_runs(tmp_path, renamed={"latmix": "affine"})
    assert set(frame["transform"]) == {"affine"} and len(frame) == 3
    base = tables.summarize(frame).sort_values("seeds").iloc[-1]
    assert (base["seeds"], base["ppl_heldout"]) == (2, 11.0)
    assert all(rec["transform"] == "affine" for rec in records.values())

    plain, _, _ = tables.load_runs(tmp_path)
    assert sorted(plain["transform"]) == ["affine", "latmix", "latmix", "latmix"]
