"""scripts/ablation_table.py: one method's configurations, named by what they change from a base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script
from test_tables import write_run

from latmix import record, tables
from latmix.tables import load_runs

ablation_table = load_script("ablation_table")


def test_a_change_is_named_by_its_keys_and_a_removed_placement_as_one():
    base = {"calib.smooth_alpha": "0.5", "transform.placements.down_proj.family": "affine",
            "transform.placements.down_proj.block_size": "32", "transform.fold_norms": "false"}
    smaller = {**base, "calib.smooth_alpha": "0.25"}
    without = {k: v for k, v in base.items() if ".down_proj." not in k}
    assert ablation_table.change(base, base) == "(base)"
    assert ablation_table.change(smaller, base) == "calib smooth_alpha=0.25"
    assert ablation_table.change(without, base) == "without down_proj"
    assert ablation_table.change({**without, "calib.steps": "3"}, base) == "without down_proj, calib steps=3"
    set_to_null = {**without, "transform.placements.down_proj": "null"}
    assert ablation_table.change(set_to_null, base) == "without down_proj"


def runs_of_an_ablation(results_dir):
    for seed, ppl in ((0, 10.0), (1, 12.0)):
        write_run(results_dir, "affine", seed=seed, heldout=ppl)
    write_run(results_dir, "affine", heldout=9.0, **{"calib.epochs": 5})
    write_run(results_dir, "affine", heldout=15.0, **{"transform.placements.residual.parametrization": "lu"})
    write_run(results_dir, "hadamard", heldout=13.0)
    write_run(results_dir, "identity", quant="none", heldout=8.0)
    write_run(results_dir, "affine", quant="nvfp4", heldout=30.0)  # another format: not in the mxfp4 table
    runs, _, _ = load_runs(results_dir)
    return runs


def test_the_base_has_the_most_seeds_and_variants_follow_best_first_then_the_others_for_scale(tmp_path):
    table = ablation_table.ablation(runs_of_an_ablation(tmp_path), "tiny", "mxfp4", "affine")
    assert list(table["change"]) == ["(base)", "calib epochs=5", "residual param=lu", "(full precision)",
                                     "(hadamard preset)"]
    assert list(table["held-out ppl"]) == ["11.00 ± 1.41", "9.00", "15.00", "8.00", "13.00"]
    assert list(table["seeds"]) == [2, 1, 1, 1, 1]
    # one-seed rows (seed 0) are measured against the base at seed 0 (10.0), not its mean (11.0)
    assert list(table["Δ held-out ppl"]) == ["+0.00", "-1.00", "+5.00", "-2.00", "+3.00"]


def test_a_row_paired_with_runs_made_elsewhere_says_where_they_differ(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, "affine", seed=seed, heldout=10.0, env={"threads": 1})
    write_run(tmp_path, "affine", heldout=9.0, env={"threads": 1}, **{"calib.epochs": 5})
    runs, _, _ = load_runs(tmp_path)
    assert ablation_table.ENVIRONMENT_COLUMN not in ablation_table.ablation(runs, "tiny", "mxfp4", "affine")
    write_run(tmp_path, "affine", heldout=9.5, env={"threads": 2}, **{"calib.epochs": 6})
    runs, _, _ = load_runs(tmp_path)
    table = ablation_table.ablation(runs, "tiny", "mxfp4", "affine").set_index("change")
    assert table.loc["calib epochs=6", ablation_table.ENVIRONMENT_COLUMN] == "threads 2 vs 1 at seed 0"
    assert table.loc["calib epochs=5", ablation_table.ENVIRONMENT_COLUMN] == ""


def test_a_row_at_seeds_the_base_did_not_run_is_measured_against_the_base_mean(tmp_path):
    for seed, ppl in ((0, 10.0), (1, 12.0)):
        write_run(tmp_path, "affine", seed=seed, heldout=ppl)
    write_run(tmp_path, "affine", seed=5, heldout=9.0, **{"calib.epochs": 5})
    runs, _, _ = load_runs(tmp_path)
    table = ablation_table.ablation(runs, "tiny", "mxfp4", "affine")
    assert list(table["Δ held-out ppl"]) == ["+0.00", "-2.00"]


def test_a_delta_over_several_seeds_carries_the_spread_of_its_per_seed_differences(tmp_path):
    # both variants are 1.0 worse on average; only the first is worse at every seed
    for seed, (base, steady, erratic) in enumerate(((10.0, 11.0, 9.0), (12.0, 13.0, 15.0))):
        write_run(tmp_path, "affine", seed=seed, heldout=base)
        write_run(tmp_path, "affine", seed=seed, heldout=steady, **{"calib.epochs": 5})
        write_run(tmp_path, "affine", seed=seed, heldout=erratic, **{"calib.epochs": 6})
    write_run(tmp_path, "affine", seed=2, heldout=11.0)  # the base has the most seeds
    runs, _, _ = load_runs(tmp_path)
    table = ablation_table.ablation(runs, "tiny", "mxfp4", "affine").set_index("change")
    assert table.loc["(base)", "Δ held-out ppl"] == "+0.00"
    assert table.loc["calib epochs=5", "Δ held-out ppl"] == "+1.00 ± 0.00"
    assert table.loc["calib epochs=6", "Δ held-out ppl"] == "+1.00 ± 2.83"


def measured_on_a_dev_split(results_dir, rec):
    """The record as scripts/dev_split.py's overrides make it: perplexity on the dev text only, no tasks."""
    path = record.record_path(results_dir, rec["run_id"])
    data = json.loads(path.read_text())
    data["metrics"].update(ppl={"calib_dev": data["metrics"]["ppl"]["heldout"]}, tasks={}, averages={})
    path.write_text(json.dumps(data))


def test_an_ablation_on_a_dev_split_is_tabulated_on_the_text_it_measured(tmp_path):
    for seed, (base, learned) in enumerate(((10.0, 9.5), (12.0, 11.0))):
        measured_on_a_dev_split(tmp_path, write_run(tmp_path, "affine", seed=seed, heldout=base))
        measured_on_a_dev_split(tmp_path, write_run(tmp_path, "affine", seed=seed, heldout=learned,
                                                    **{"calib.epochs": 5}))
    measured_on_a_dev_split(tmp_path, write_run(tmp_path, "affine", seed=2, heldout=11.0))  # the base: most seeds
    runs, _, _ = load_runs(tmp_path)
    table = ablation_table.ablation(runs, "tiny", "mxfp4", "affine")
    assert list(table.columns) == ["change", "method", "seeds", "calib_dev ppl", "Δ calib_dev ppl", "lower calib_dev ppl",
                                  "p calib_dev ppl"]
    assert list(table["calib_dev ppl"]) == ["11.00 ± 1.00", "10.25 ± 1.06"]
    assert list(table["Δ calib_dev ppl"]) == ["+0.00", "-0.75 ± 0.35"]


def test_rows_whose_change_matches_exclude_are_left_out_but_never_the_base(tmp_path):
    table = ablation_table.ablation(runs_of_an_ablation(tmp_path), "tiny", "mxfp4", "affine", exclude="^calib|base")
    assert list(table["change"]) == ["(base)", "residual param=lu", "(full precision)", "(hadamard preset)"]
    with pytest.raises(SystemExit, match="is not a regular expression"):
        ablation_table.ablation(runs_of_an_ablation(tmp_path / "again"), "tiny", "mxfp4", "affine", exclude="(base")


def test_a_chosen_base_run_renames_the_rows_and_an_unknown_one_is_refused(tmp_path):
    runs = runs_of_an_ablation(tmp_path)
    lu = runs[runs["config"].apply(lambda c: c.get("transform.placements.residual.parametrization") == "lu")]
    table = ablation_table.ablation(runs, "tiny", "mxfp4", "affine", base_run=lu["run_id"].iloc[0])
    assert table["change"].iloc[0] == "(base)" and "residual param=qr" in list(table["change"])
    with pytest.raises(SystemExit, match="run nope is not among the transform=affine runs"):
        ablation_table.ablation(runs, "tiny", "mxfp4", "affine", base_run="nope")
    with pytest.raises(SystemExit, match="no record of transform=rotation"):
        ablation_table.ablation(runs, "tiny", "mxfp4", "rotation")


def test_one_setting_changed_alike_at_several_placements_reads_once():
    base = {f"transform.placements.{p}.block_size": "64" for p in ("pre_linear", "attn_vo", "down_proj")}
    base["calib.smooth_alpha"] = "0.5"
    smaller = {**{k: "32" for k in base if k.endswith("block_size")}, "calib.smooth_alpha": "0"}
    assert ablation_table.change(smaller, base) == "block_size=32 at 3 placements, calib smooth_alpha=0"
    one = {**base, "transform.placements.down_proj.block_size": "32"}
    assert ablation_table.change(one, base) == "down_proj block_size=32"


def settings_of_a_preset_file(presets: Path, transform: str, text: str) -> dict[str, str]:
    """The settings scripts/ablation_table.py reads from a preset file of `text` in the folder `presets`."""
    presets.mkdir(exist_ok=True)
    (presets / f"{transform}.yaml").write_text(text)
    return ablation_table.preset_settings(transform, presets)


def test_another_method_is_shown_first_as_its_preset_file_sets_it_not_as_its_most_seeded_diagnosis(tmp_path):
    write_run(tmp_path, "hadamard", heldout=13.0, **{"transform.fold_norms": True})
    for seed in (0, 1):
        write_run(tmp_path, "hadamard", seed=seed, heldout=11.0, **{"transform.fold_norms": False})
    group = tables.summarize(load_runs(tmp_path)[0])
    settings = settings_of_a_preset_file(tmp_path / "presets", "hadamard", "name: hadamard\nfold_norms: true\nseed: ${seed}\n")
    assert settings == {"transform.fold_norms": "true"}
    assert ablation_table.own_preset(group, settings)["ppl_heldout"] == 13.0
    assert ablation_table.own_preset(group, {})["ppl_heldout"] == 11.0  # no file: the most seeded
    assert ablation_table.preset_settings("no_such_preset", tmp_path / "presets") == {}


def test_a_run_with_a_map_at_a_placement_its_preset_file_does_not_name_is_not_the_preset(tmp_path):
    o_proj = {"transform.placements.o_proj.family": "affine"}
    for seed in (0, 1):  # as many seeds as the preset's own runs: the tie must not go to the added map
        write_run(tmp_path, "affine", seed=seed, heldout=11.0, **o_proj)
        write_run(tmp_path, "affine", seed=seed, heldout=13.0)
    runs = load_runs(tmp_path)[0]
    settings = settings_of_a_preset_file(tmp_path / "presets", "affine",
                                         "placements:\n  residual: {family: affine, parametrization: qr}\n")
    assert ablation_table.own_preset(tables.summarize(runs), settings)["ppl_heldout"] == 13.0
    preset_run = runs[runs["ppl_heldout"] == 13.0]["config"].iloc[0]
    assert ablation_table.runs_as_the_file_sets_it({**preset_run, "transform.placements.o_proj": "null"}, settings)


def test_a_global_package_preset_file_names_its_keys_from_the_root():
    settings = ablation_table.preset_settings("flatquant")
    assert settings["transform.fold_norms"] == "true" and settings["calib.mode"] == "layer_wise"
    assert "transform.seed" not in settings and "transform.name" not in settings


def with_ood(results_dir, rec, ood):
    """The record with an out-of-domain perplexity beside its held-out one."""
    path = record.record_path(results_dir, rec["run_id"])
    data = json.loads(path.read_text())
    data["metrics"]["ppl"]["ood"] = ood
    path.write_text(json.dumps(data))


def test_lower_counts_the_paired_seeds_at_which_a_row_beats_the_base_for_each_perplexity(tmp_path):
    for seed, (base, mostly_better) in enumerate(((10.0, 9.0), (12.0, 12.5), (11.0, 10.0))):
        with_ood(tmp_path, write_run(tmp_path, "affine", seed=seed, heldout=base), ood=20.0)
        with_ood(tmp_path, write_run(tmp_path, "affine", seed=seed, heldout=mostly_better, **{"calib.epochs": 5}),
                 ood=19.0)
    write_run(tmp_path, "affine", seed=3, heldout=11.0)  # the base has the most seeds
    write_run(tmp_path, "affine", seed=7, heldout=8.0, **{"calib.epochs": 6})  # the base never ran seed 7
    runs, _, _ = load_runs(tmp_path)
    table = ablation_table.ablation(runs, "tiny", "mxfp4", "affine").set_index("change")
    assert table.loc["calib epochs=5", "lower held-out ppl"] == "2 of 3"
    # differences -1, +0.5, -1 (mean -0.5): of the 8 sign patterns, the 4 whose two 1s share a sign
    # have |mean| >= 0.5; the other 4 have |mean| = 0.5 / 3
    assert table.loc["calib epochs=5", "p held-out ppl"] == "0.5"
    # out of domain lower by 1 at every seed: only the 2 all-same-sign patterns reach |mean| 1
    assert table.loc["calib epochs=5", "lower ood ppl"] == "3 of 3"
    assert table.loc["calib epochs=5", "p ood ppl"] == "0.25"
    assert "lower task avg %" not in table.columns
    for unpaired in ("(base)", "calib epochs=6"):
        assert table.loc[unpaired, "lower held-out ppl"] == table.loc[unpaired, "p held-out ppl"] == ""
