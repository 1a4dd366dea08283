"""Two methods compared item for item and seed for seed: per-item answers in the record, and what
scripts/paired_tasks.py makes of them and of the perplexities (latmix/paired.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_script
from test_record import make_record
from test_tables import write_run

from latmix import record
from latmix.evaluate import task_items
from latmix.paired import ALL_TASKS, PairingError, paired_perplexities, paired_rows, seed_sign_flip_p
from latmix.tables import load_runs

paired_tasks = load_script("paired_tasks")


def sample(doc_id: int, acc: float, acc_norm: float | None = None, filter_key: str = "none") -> dict:
    logged = {"doc_id": doc_id, "doc_hash": f"hash{doc_id}", "filter": filter_key, "acc": acc}
    return logged if acc_norm is None else {**logged, "acc_norm": acc_norm}


def items(answers: str, metric: str = "acc_norm", docs: str = "same") -> dict:
    return {"docs": docs, metric: answers}


def run(seed: int, **tasks: dict) -> dict:
    return {"run_id": f"run{seed}", "eval": {"task_items": tasks}}


# --- what a run records -----------------------------------------------------------------------------


def test_lm_eval_samples_become_one_character_per_item_in_doc_id_order():
    samples = {
        "tiny_hellaswag": [sample(2, 0.0, 1.0), sample(0, 1.0, 0.0), sample(1, 1.0, 1.0)],
        "tiny_lambada": [sample(1, 0.0), sample(0, 1.0), sample(0, 0.0, filter_key="other")],
    }
    recorded = task_items(samples)
    assert recorded["tiny_hellaswag"]["acc"] == "110" and recorded["tiny_hellaswag"]["acc_norm"] == "011"
    assert recorded["tiny_lambada"]["acc"] == "10" and "acc_norm" not in recorded["tiny_lambada"]
    # the digest names the items and their order: the same items give the same digest
    assert recorded["tiny_hellaswag"]["docs"] == task_items({"t": [sample(1, 0), sample(0, 0), sample(2, 0)]})["t"]["docs"]
    assert recorded["tiny_hellaswag"]["docs"] != recorded["tiny_lambada"]["docs"]


def test_a_record_with_malformed_per_item_answers_is_refused():
    rec = make_record()
    rec["eval"] = {"task_items": {"piqa": items("0112")}}
    with pytest.raises(record.RecordError, match=r"eval\.task_items\.piqa: .* string of 0s and 1s"):
        record.validate_record(rec)
    rec["eval"] = {"task_items": {"piqa": {"docs": "d", "acc": "01", "acc_norm": "011"}}}
    with pytest.raises(record.RecordError, match="different numbers of items"):
        record.validate_record(rec)
    rec["eval"] = {"task_items": {"piqa": {"docs": "d", "acc": "01", "acc_norm": "01"}}}
    assert record.validate_record(rec) is rec


# --- the statistics ---------------------------------------------------------------------------------


def test_identical_answers_differ_by_nothing_and_are_not_significant():
    a = {0: run(0, piqa=items("0110" * 25)), 1: run(1, piqa=items("1100" * 25))}
    rows = paired_rows(a, a, resamples=2000)
    assert [r.task for r in rows] == ["piqa", ALL_TASKS]
    assert all(r.delta == 0 and (r.low, r.high) == (0, 0) and r.p_value == 1 and r.only_a == r.only_b == 0
               for r in rows)


def test_the_difference_is_the_mean_over_seeds_and_items_and_its_interval_covers_it():
    # seed 0: A right on 60 of 100, B on 50 (B's right answers a subset of A's); seed 1: both 50, alike
    a = {0: run(0, piqa=items("1" * 60 + "0" * 40)), 1: run(1, piqa=items("1" * 50 + "0" * 50))}
    b = {0: run(0, piqa=items("1" * 50 + "0" * 50)), 1: run(1, piqa=items("1" * 50 + "0" * 50))}
    row = paired_rows(a, b, resamples=4000)[0]
    assert (row.items, row.seeds, row.only_a, row.only_b) == (100, 2, 10, 0)
    assert row.accuracy_a == pytest.approx(55.0) and row.accuracy_b == pytest.approx(50.0)
    assert row.delta == pytest.approx(5.0)
    assert row.low < 5.0 < row.high and row.low > 0  # 10 discordant items, all one way
    assert row.p_value < 0.01


def test_a_difference_carried_by_items_split_both_ways_is_not_significant():
    # 20 discordant items: 11 for A, 9 for B
    a = {0: run(0, piqa=items("1" * 11 + "0" * 9 + "1" * 40 + "0" * 40))}
    b = {0: run(0, piqa=items("0" * 11 + "1" * 9 + "1" * 40 + "0" * 40))}
    row = paired_rows(a, b, resamples=4000)[0]
    assert row.delta == pytest.approx(2.0) and row.low < 0 < row.high and row.p_value > 0.5


def test_all_tasks_is_the_mean_of_the_tasks_differences_like_the_tables_task_average():
    a = {0: run(0, piqa=items("1" * 30 + "0" * 70), arc=items("1" * 5 + "0" * 5, metric="acc"))}
    b = {0: run(0, piqa=items("1" * 20 + "0" * 80), arc=items("1" * 5 + "0" * 5, metric="acc"))}
    rows = {r.task: r for r in paired_rows(a, b, resamples=1000)}
    overall = rows[ALL_TASKS]
    assert overall.delta == pytest.approx((10.0 + 0.0) / 2)
    assert overall.accuracy_a - overall.accuracy_b == pytest.approx(overall.delta)
    assert (overall.items, overall.only_a) == (110, 10)


def test_the_same_records_give_the_same_table():
    a = {0: run(0, piqa=items("".join(np.random.default_rng(1).choice(["0", "1"], 200))))}
    b = {0: run(0, piqa=items("1" * 100 + "0" * 100))}
    assert paired_rows(a, b, resamples=500) == paired_rows(a, b, resamples=500)


def test_runs_on_different_items_or_with_no_common_seed_are_not_paired():
    a = {0: run(0, piqa=items("0101", docs="first 4 items"))}
    b = {0: run(0, piqa=items("0101", docs="another 4 items"))}
    with pytest.raises(PairingError, match="did not answer the same items"):
        paired_rows(a, b)
    with pytest.raises(PairingError, match="no seed was run by both"):
        paired_rows(a, {1: b[0]})
    with pytest.raises(PairingError, match="force=true"):
        paired_rows({0: run(0)}, {0: run(0)})


# --- perplexity, seed by seed ------------------------------------------------------------------------


def measured(seed: int, **ppl: float) -> dict:
    return {"run_id": f"run{seed}", "metrics": {"ppl": ppl}}


def test_perplexities_are_paired_at_the_seeds_both_ran_on_the_texts_both_measured():
    a = {0: measured(0, heldout=40.0, ood=56.0), 1: measured(1, heldout=39.5, ood=57.0),
         2: measured(2, heldout=39.0, ood=55.0), 3: measured(3, heldout=30.0, ood=30.0)}
    b = {0: measured(0, heldout=41.0, ood=56.5), 1: measured(1, heldout=40.0, ood=56.0),
         2: measured(2, heldout=39.5), 4: measured(4, heldout=50.0, ood=50.0)}
    (heldout,) = paired_perplexities(a, b)  # seed 2 of B measured no ood text, seeds 3 and 4 have no partner
    assert heldout.text == "heldout" and heldout.seeds == (0, 1, 2)
    assert heldout.differences.tolist() == [-1.0, -0.5, -0.5]
    assert heldout.lower == 3 and heldout.p_value == pytest.approx(2 / 2**3)  # one sign at every seed
    del b[2]
    heldout, ood = paired_perplexities(a, b)
    assert ood.differences.tolist() == [-0.5, 1.0] and ood.lower == 1 and ood.p_value == 1.0


def test_runs_with_no_common_seed_or_text_have_no_perplexity_pairs():
    with pytest.raises(PairingError, match="no seed was run by both"):
        paired_perplexities({0: measured(0, heldout=1.0)}, {1: measured(1, heldout=1.0)})
    with pytest.raises(PairingError, match="share no perplexity text"):
        paired_perplexities({0: measured(0, heldout=1.0)}, {0: measured(0, calib_dev=1.0)})


# --- the script -------------------------------------------------------------------------------------


def with_items(results_dir, rec: dict, answers: str) -> None:
    rec["eval"] = {"task_items": {"piqa": items(answers)}}
    record.write_record(record.record_path(results_dir, rec["run_id"]), rec)


def test_the_script_pairs_two_methods_by_name_and_prints_one_row_per_task(tmp_path, capsys, monkeypatch):
    for seed in (0, 1):
        with_items(tmp_path, write_run(tmp_path, "affine", seed=seed), "1" * 60 + "0" * 40)
        with_items(tmp_path, write_run(tmp_path, "hadamard", seed=seed), "1" * 50 + "0" * 50)
    write_run(tmp_path, "hadamard", seed=2)  # no per-item answers, no partner: left out
    monkeypatch.setattr("sys.argv", ["paired_tasks", "affine", "hadamard", "--model", "tiny",
                                     "--results-dir", str(tmp_path), "--resamples", "500"])
    paired_tasks.main()
    out = capsys.readouterr().out
    assert "A = affine+gptq, B = hadamard+gptq" in out and "seeds 0, 1 paired" in out
    assert "| piqa" in out and "+10.00" in out and "100 x 2" in out
    assert "| heldout | 2       | 10.00 ± 0.00 | 10.00 ± 0.00 | +0.00, +0.00" in out  # and the perplexities
    # against full precision, whose format is none
    with_items(tmp_path, write_run(tmp_path, "identity", quant="none"), "1" * 55 + "0" * 45)
    monkeypatch.setattr("sys.argv", ["paired_tasks", "affine", "identity", "--b-quant", "none", "--model", "tiny",
                                     "--results-dir", str(tmp_path), "--resamples", "500"])
    paired_tasks.main()
    out = capsys.readouterr().out
    assert "A mxfp4, B none" in out and "seeds 0, 1 paired" in out and "+5.00" in out  # its one record, each seed
    assert "warning" not in out  # every run here ran alike


def test_the_script_warns_when_the_arms_ran_at_different_thread_counts(tmp_path, capsys, monkeypatch):
    for seed in (0, 1):
        with_items(tmp_path, write_run(tmp_path, "affine", seed=seed, env={"threads": 1}), "1" * 60 + "0" * 40)
        with_items(tmp_path, write_run(tmp_path, "hadamard", seed=seed, env={"threads": 1 + seed}), "1" * 50 + "0" * 50)
    monkeypatch.setattr("sys.argv", ["paired_tasks", "affine", "hadamard", "--model", "tiny",
                                     "--results-dir", str(tmp_path), "--resamples", "100"])
    paired_tasks.main()
    out = capsys.readouterr().out
    assert "| piqa" in out  # the table still comes, with the warning under it
    assert "warning: A and B ran in different environments (threads 1 vs 2 at seed 1)" in out


def test_the_script_names_what_to_change_when_the_choice_is_unclear(tmp_path):
    frame, _, records = load_runs(tmp_path)
    with pytest.raises(SystemExit, match="no record of 'affine' at tiny mxfp4"):
        paired_tasks.select(frame, records, "affine", "tiny", "mxfp4")
    with_items(tmp_path, write_run(tmp_path, "affine"), "01")
    with_items(tmp_path, write_run(tmp_path, "affine", **{"calib.epochs": 5}), "01")
    frame, _, records = load_runs(tmp_path)
    with pytest.raises(SystemExit, match=r"several configurations of .affine. .* name one by its id"):
        paired_tasks.select(frame, records, "affine", "tiny", "mxfp4")
    five = frame[frame["config"].apply(lambda c: c.get("calib.epochs") == "5")]["config_id"].iloc[0]
    label, chosen = paired_tasks.select(frame, records, five[:6], "tiny", "mxfp4")
    assert label == "affine+gptq" and list(chosen) == [0]
    run_of_five = frame[frame["config_id"] == five]["run_id"].iloc[0]
    assert paired_tasks.select(frame, records, run_of_five[:6], "tiny", "mxfp4")[1] == chosen  # named by a run


def test_runs_without_per_item_answers_are_compared_on_perplexity_alone(tmp_path, capsys, monkeypatch):
    for seed, (learned, start) in enumerate([(39.5, 40.0), (39.0, 40.5), (40.0, 39.5)]):
        write_run(tmp_path, "affine", seed=seed, heldout=learned)
        write_run(tmp_path, "hadamard", seed=seed, heldout=start)
    monkeypatch.setattr("sys.argv", ["paired_tasks", "affine", "hadamard", "--model", "tiny",
                                     "--results-dir", str(tmp_path)])
    paired_tasks.main()
    out = capsys.readouterr().out
    assert "| heldout | 3       | 39.50 ± 0.50 | 40.00 ± 0.50 | -0.50, -1.50, +0.50 | -0.50 ± 1.00 | 2 of 3" in out
    assert "No task pairs: not every record holds per-item answers" in out and "force=true" in out


# --- seeds compared pair by pair (scripts/ablation_table.py's p column) --------------------------------


def test_differences_of_one_sign_at_every_seed_reach_the_smallest_p_the_seeds_allow():
    assert seed_sign_flip_p(np.array([-0.6, -0.4, -0.6, -0.1, -0.5])) == pytest.approx(2 / 2**5)
    assert seed_sign_flip_p(np.array([-1.0])) == 1.0  # one seed cannot tell a change from chance


def test_a_mean_carried_by_one_large_seed_against_the_others_is_not_significant():
    # mean -0.41: 8 of the 32 sign patterns land at least as far from 0
    assert seed_sign_flip_p(np.array([-0.77, -0.22, 0.58, -1.08, -0.55])) == pytest.approx(8 / 32)
    assert seed_sign_flip_p(np.array([0.5, -0.5])) == 1.0


def test_beyond_the_exact_limit_the_sign_patterns_are_drawn_from_a_fixed_generator():
    one_sign = -np.ones(20)
    assert seed_sign_flip_p(one_sign) < 1e-3
    assert seed_sign_flip_p(one_sign) == seed_sign_flip_p(one_sign)  # a fixed generator
    with pytest.raises(ValueError, match="no paired difference"):
        seed_sign_flip_p(np.array([]))
