"""Paper tables from result records: one row per method, mean ± std over seeds, ours vs published."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_record import make_record

from latmix import record, tables

ROOT = Path(__file__).resolve().parent.parent


def write_run(results_dir: Path, transform: str, seed: int, heldout: float, piqa: float, **extra) -> None:
    rec = make_record(run_id=f"{transform}{seed}", transform=transform, seed=seed, **extra)
    rec["metrics"]["ppl"] = {"heldout": heldout}
    rec["metrics"]["tasks"] = {"piqa": {"acc": piqa - 0.01, "acc_norm": piqa}}
    rec["metrics"]["averages"] = {"avg6": None, "avg8": None, "mean": piqa}
    record.write_record(record.record_path(results_dir, rec["run_id"]), rec)


def test_seeds_fold_into_mean_and_std_per_method(tmp_path):
    write_run(tmp_path, "affine", 0, heldout=10.0, piqa=0.70)
    write_run(tmp_path, "affine", 1, heldout=12.0, piqa=0.72)
    write_run(tmp_path, "identity", 0, heldout=20.0, piqa=0.60)
    frame, skipped = tables.load_results(tmp_path)
    summary = tables.summarize(frame)
    assert skipped == []
    assert list(summary["method"]) == ["affine+gptq", "identity+gptq"]
    affine = summary.set_index("method").loc["affine+gptq"]
    assert affine["ppl_heldout"] == pytest.approx(11.0)
    assert affine["ppl_heldout_std"] == pytest.approx(2**0.5)
    assert affine["piqa"] == pytest.approx(71.0)  # acc_norm, in percent
    assert affine["seeds"] == 2
    shown = tables.display_table(summary).set_index("method")
    assert shown.loc["affine+gptq", "heldout ppl"] == "11.00 ± 1.41"
    assert shown.loc["identity+gptq", "heldout ppl"] == "20.00"


def test_full_precision_rows_are_labelled_by_transform_only():
    rec = make_record(config={"quant": {"weight_format": None}}, quant="none", transform="identity")
    assert tables.record_row(rec)["method"] == "identity"


def test_tables_are_written_as_markdown_latex_and_csv(tmp_path):
    write_run(tmp_path, "affine", 0, heldout=10.0, piqa=0.70)
    paths, messages = tables.regenerate(tmp_path, tmp_path / "tables", reference=None)
    assert messages == []
    assert "| affine+gptq" in paths["md"].read_text().replace("  ", " ")
    assert "\\begin{tabular}" in paths["tex"].read_text()
    assert pd.read_csv(paths["csv"])["ppl_heldout"].tolist() == [10.0]


def test_a_corrupted_record_is_reported_and_the_rest_still_tabulated(tmp_path):
    write_run(tmp_path, "affine", 0, heldout=10.0, piqa=0.70)
    (tmp_path / "runs" / "broken.json").write_text("{not json")
    paths, messages = tables.regenerate(tmp_path, tmp_path / "tables")
    assert len(messages) == 1 and "broken.json" in messages[0]
    assert len(pd.read_csv(paths["csv"])) == 1


def test_ours_beside_published_with_the_delta():
    summary = pd.DataFrame(
        [{"model": "llama3-8b", "quant": "int4", "method": "hadamard+gptq", "ppl_wikitext2": 8.5,
          "ppl_wikitext2_std": float("nan"), "seeds": 1}]
    )
    reference = pd.DataFrame(
        [
            {"model_key": "llama3-8b", "quant_key": "int4", "method_key": "hadamard+gptq",
             "metric_key": "wikitext2", "value": "8.16", "source_id": "flatquant_readme"},
            {"model_key": "llama3-8b", "quant_key": "mxfp4", "method_key": "hadamard+gptq",
             "metric_key": "wikitext2", "value": "7.9", "source_id": "other"},
        ]
    )
    same_format = tables.compare_with_reference(summary, reference)
    assert same_format[["published", "delta", "source"]].to_dict("records") == [
        {"published": 8.16, "delta": pytest.approx(0.34), "source": "flatquant_readme"}
    ]
    assert len(tables.compare_with_reference(summary, reference, match_format=False)) == 2


def test_the_shipped_reference_csv_has_the_mapping_columns():
    reference = tables.load_reference(ROOT / "results" / "reference" / "published.csv")
    assert {"flatquant_readme", "spinquant_readme", "quarot_paper_t12", "mrgptq_t1"} <= set(reference["source_id"])
    assert (reference["paper"] != "").all() and (reference["url"] != "").all()
    llama3 = reference[(reference["model_key"] == "llama3-8b") & (reference["metric_key"] == "wikitext2")]
    assert set(llama3["method_key"]) >= {"hadamard+gptq", "rotation+gptq", "flatquant+gptq"}


def test_make_tables_script_prints_skips_and_writes_files(tmp_path):
    write_run(tmp_path, "affine", 0, heldout=10.0, piqa=0.70)
    (tmp_path / "runs" / "broken.json").write_text("[]")
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tables.py"), "--results-dir", str(tmp_path),
         "--out", str(tmp_path / "tables")],
        capture_output=True, text=True, check=True,
    )
    assert "broken.json" in out.stderr
    assert "affine+gptq" in out.stdout
    assert (tmp_path / "tables" / "results.md").exists()
