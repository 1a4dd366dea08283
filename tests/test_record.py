"""The result record: identity by config hash, schema validation, atomic writes, skipping bad files."""

from __future__ import annotations

import copy
import json
import os
import subprocess

import pytest
from omegaconf import OmegaConf
from test_config import compose_config

from latmix import record


def make_record(**overrides) -> dict:
    rec = {
        "schema_version": record.SCHEMA_VERSION,
        "run_id": "0123456789ab",
        "created": "2026-01-01T00:00:00+00:00",
        "git_sha": None,
        "config": {"quant": {"weight_format": "mxfp4"}, "seed": 0},
        "model": "tiny",
        "quant": "mxfp4",
        "transform": "affine",
        "weight_quantizer": "gptq",
        "seed": 0,
        "metrics": {
            "ppl": {"heldout": 12.5},
            "tasks": {"piqa": {"acc": 0.7, "acc_norm": 0.72, "acc_stderr": 0.01}},
            "averages": {"avg6": None, "avg8": None, "mean": 0.72},
        },
        "calibration": {"seconds": 1.0, "per_layer": []},
        "timing": {"load": 0.1, "calibrate": 1.0},
        "env": {"torch": "2.13.0"},
    }
    rec.update(overrides)
    return rec


def test_run_id_ignores_where_and_how_keys_but_not_what_is_computed():
    cfg = {"seed": 0, "quant": {"block_size": 32}, "paths": {"results_dir": "/a"}, "logger": {"mode": "offline"}}
    moved = {**cfg, "paths": {"results_dir": "/b"}, "logger": {"mode": "disabled"}, "force": True}
    reseeded = {**cfg, "seed": 1}
    assert record.run_id(cfg) == record.run_id(moved)
    assert record.run_id(cfg) != record.run_id(reseeded)
    assert len(record.run_id(cfg)) == 12 and int(record.run_id(cfg), 16) >= 0


def test_run_id_ignores_how_checkpoints_are_kept_and_whether_to_wait():
    cfg = {"seed": 0, "calib": {"steps": 4, "checkpoint_every": 2}}
    kept = {**cfg, "wait": True, "calib": {**cfg["calib"], "checkpoint_minutes": 1, "keep_checkpoints": True}}
    assert record.run_id(cfg) == record.run_id(kept)
    assert record.run_id(cfg) != record.run_id({**cfg, "calib": {**cfg["calib"], "checkpoint_every": 3}})


def test_a_later_setting_at_its_implicit_earlier_value_keeps_earlier_run_ids():
    earlier = {"seed": 0, "calib": {"steps": 4}}
    nearest = {"seed": 0, "calib": {"steps": 4, "rounding": "nearest"}}
    noise = {"seed": 0, "calib": {"steps": 4, "rounding": "noise"}}
    assert record.run_id(nearest) == record.run_id(earlier)
    assert record.run_id(noise) != record.run_id(earlier)
    whole = {"seed": 0, "calib": {"steps": 4, "rounding": "nearest", "micro_batch_size": None}}
    split = {"seed": 0, "calib": {"steps": 4, "rounding": "nearest", "micro_batch_size": 2}}
    assert record.run_id(whole) == record.run_id(earlier)
    assert record.run_id(split) != record.run_id(earlier)


def test_a_whole_number_at_a_float_setting_is_the_same_run_however_it_is_spelled():
    # Hydra reads calib.reg_weight=0 on the command line as an int, a preset's `reg_weight: 0.0` as a float
    spelled = {
        spelling: OmegaConf.to_container(
            compose_config(f"calib.reg_weight={spelling}", f"optim.lr={spelling}"), resolve=True
        )
        for spelling in ("0", "0.0")
    }
    assert spelled["0"]["calib"]["reg_weight"] == 0 and isinstance(spelled["0"]["calib"]["reg_weight"], int)
    assert record.run_id(spelled["0"]) == record.run_id(spelled["0.0"])
    other_weight = OmegaConf.to_container(compose_config("calib.reg_weight=1", "optim.lr=0"), resolve=True)
    assert record.run_id(spelled["0"]) != record.run_id(other_weight)


def test_whole_numbers_at_integer_settings_stay_integers():
    typed = record.typed_numbers({"calib": {"steps": 4, "reg_weight": 1, "offload": True}, "optim": {"momentum": None}})
    assert typed == {"calib": {"steps": 4, "reg_weight": 1.0, "offload": True}, "optim": {"momentum": None}}
    assert type(typed["calib"]["steps"]) is int and type(typed["calib"]["reg_weight"]) is float


def test_run_id_does_not_depend_on_key_order():
    assert record.run_id({"a": 1, "b": {"c": 2, "d": 3}}) == record.run_id({"b": {"d": 3, "c": 2}, "a": 1})


def test_a_valid_record_round_trips_through_an_atomic_write(tmp_path):
    path = record.record_path(tmp_path, "0123456789ab")
    rec = make_record()
    record.write_record(path, rec)
    assert record.read_record(path) == rec
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_a_failed_write_leaves_the_previous_record_intact(tmp_path, monkeypatch):
    path = record.record_path(tmp_path, "0123456789ab")
    record.write_record(path, make_record())

    def fail(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        record.write_record(path, make_record(seed=1))
    assert record.read_record(path)["seed"] == 0
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("metrics"), "missing field 'metrics'"),
        (lambda r: r.update(seed="0"), "field 'seed'"),
        (lambda r: r.update(schema_version=99), "schema_version"),
        (lambda r: r["metrics"]["ppl"].update(heldout="12"), "metrics.ppl.heldout"),
        (lambda r: r["metrics"]["tasks"]["piqa"].update(acc=True), "metrics.tasks.piqa.acc"),
        (lambda r: r["metrics"].pop("averages"), "metrics.averages"),
        (lambda r: r["timing"].update(load="fast"), "timing.load"),
        (lambda r: r.update(git_uncommitted="latmix/mx.py"), "git_uncommitted"),
        (lambda r: r.update(git_uncommitted=[3]), "git_uncommitted"),
    ],
)
def test_schema_violations_name_the_field(mutate, message):
    rec = copy.deepcopy(make_record())
    mutate(rec)
    with pytest.raises(record.RecordError, match=message):
        record.validate_record(rec)


def test_records_from_before_uncommitted_code_was_kept_still_validate():
    assert "git_uncommitted" not in make_record()
    assert record.validate_record(make_record(git_uncommitted=None))
    assert record.validate_record(make_record(git_uncommitted=["latmix/mx.py"]))


def git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True, capture_output=True)


def test_the_record_lists_code_that_differs_from_its_commit_and_ignores_everything_else(tmp_path):
    package, conf, entry = tmp_path / "pkg", tmp_path / "conf", tmp_path / "run.py"
    code = (package, conf, entry)
    assert record.uncommitted_code(code) is None  # not a git checkout: unknown, not clean
    package.mkdir(), conf.mkdir()
    for path in (package / "quantize.py", package / "old.py", conf / "run.yaml", entry, tmp_path / "README.md"):
        path.write_text("x = 1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "first")
    assert record.uncommitted_code(code) == []

    (tmp_path / "README.md").write_text("docs change no number\n")
    (tmp_path / "notes.txt").write_text("nor does a file outside the code\n")
    assert record.uncommitted_code(code) == []

    (package / "quantize.py").write_text("x = 2\n")  # modified
    (conf / "new.yaml").write_text("a: 1\n")  # new, untracked
    git(tmp_path, "mv", "pkg/old.py", "pkg/renamed.py")  # staged rename: one change, under its new name
    entry.unlink()  # deleted
    assert record.uncommitted_code(code) == ["conf/new.yaml", "pkg/quantize.py", "pkg/renamed.py", "run.py"]


def test_an_invalid_record_is_never_written(tmp_path):
    path = record.record_path(tmp_path, "bad")
    with pytest.raises(record.RecordError):
        record.write_record(path, make_record(model=3))
    assert not path.exists()


def test_malformed_files_are_reported_by_path_and_skipped(tmp_path):
    runs = tmp_path / "runs"
    record.write_record(runs / "good.json", make_record())
    (runs / "truncated.json").write_text('{"run_id": "x", ')
    (runs / "wrong.json").write_text(json.dumps({"run_id": "x"}))
    items = list(record.iter_records(tmp_path))
    good = [i for i in items if isinstance(i, dict)]
    skipped = {i.path.name: i.reason for i in items if isinstance(i, record.SkippedRecord)}
    assert [g["run_id"] for g in good] == ["0123456789ab"]
    assert set(skipped) == {"truncated.json", "wrong.json"}
    assert "not readable JSON" in skipped["truncated.json"]
    assert str(runs / "wrong.json") in skipped["wrong.json"] and "missing field" in skipped["wrong.json"]


@pytest.fixture
def ids_before_and_after_path_spelling():
    """(config, run id) of one command as an earlier identity keyed it (its text path absolute) and as
    the current identity keys it (relative to the project root)."""
    from latmix.config import PROJECT_ROOT, identity_config

    now = identity_config(compose_config("calib.path=data/text/heldout.txt"))
    earlier = {**now, "calib": {**now["calib"], "path": str(PROJECT_ROOT / "data" / "text" / "heldout.txt")}}
    return (earlier, record.run_id(earlier)), (now, record.run_id(now))


def test_rekey_moves_a_record_keyed_by_an_absolute_text_path_to_the_id_the_same_command_computes_now(
    tmp_path, ids_before_and_after_path_spelling,
):
    from conftest import load_script

    rekey = load_script("rekey_records").rekey
    (earlier, old_id), (now, new_id) = ids_before_and_after_path_spelling
    old = make_record(run_id=old_id, config=earlier)
    current = make_record(run_id=new_id, config=now, seed=1)
    for rec in (old, current):
        record.write_record(record.record_path(tmp_path, rec["run_id"]), rec)

    assert rekey(tmp_path, apply=False) == [(old_id, new_id, "kept: a different record has the new id")]
    record.record_path(tmp_path, new_id).unlink()
    assert rekey(tmp_path, apply=False) == [(old_id, new_id, "would move")]
    assert record.record_path(tmp_path, old_id).exists()

    assert rekey(tmp_path, apply=True) == [(old_id, new_id, "moved")]
    moved = record.read_record(record.record_path(tmp_path, new_id))
    assert moved == {**old, "run_id": new_id, "config": now}
    assert not record.record_path(tmp_path, old_id).exists()
    assert rekey(tmp_path, apply=True) == []


def test_rekey_moves_the_learned_maps_export_and_checkpoint_kept_under_the_old_id(
    tmp_path, ids_before_and_after_path_spelling,
):
    from conftest import load_script

    rekey = load_script("rekey_records").rekey
    (earlier, old_id), (_, new_id) = ids_before_and_after_path_spelling
    record.write_record(record.record_path(tmp_path, old_id), make_record(run_id=old_id, config=earlier))
    maps, export, ckpt = record.run_files(tmp_path, old_id)
    maps.parent.mkdir(parents=True)
    maps.write_text("maps")
    for folder in (export, ckpt):
        folder.mkdir(parents=True)
    (export / record.EXPORT_MANIFEST).write_text(json.dumps({"run_id": old_id, "model": "m"}))
    (ckpt / "calibration.pt").write_text("state")

    rekey(tmp_path, apply=True)

    maps, export, ckpt = record.run_files(tmp_path, new_id)
    assert maps.read_text() == "maps" and (ckpt / "calibration.pt").read_text() == "state"
    assert json.loads((export / record.EXPORT_MANIFEST).read_text()) == {"run_id": new_id, "model": "m"}
    assert not any(path.exists() for path in record.run_files(tmp_path, old_id))
