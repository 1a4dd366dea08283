"""A recorded run is reused only while what it read is unchanged (latmix/provenance.py): the run id hashes
the config, not the files it names, so the record's sha256 of each text and the weights' fingerprint by
content are what tell them apart."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hydra import compose, initialize_config_dir

from latmix import config, provenance
from latmix.files import text_source
from latmix.models.cache import model_dir
from latmix.settings import ppl_dataset_name

ROOT = Path(__file__).resolve().parent.parent


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return config.build_experiment(compose("config", overrides=["model=tiny", *overrides]))


def texts_of(tmp_path: Path) -> tuple[Path, Path]:
    calib, heldout = tmp_path / "calib.txt", tmp_path / "mine.txt"
    calib.write_text("calibration words\n" * 50)
    heldout.write_text("held-out words\n" * 50)
    return calib, heldout


def record_of(exp) -> dict:
    """What a run of `exp` records about its texts, read from the files as they are now."""
    sources = {}
    for entry in exp.eval.ppl_datasets:
        if (path := provenance.ppl_text_file(entry)) is not None:
            sources[ppl_dataset_name(entry)] = text_source(path)
    return {"calibration": {"text": provenance.calibration_text(exp.calib)}, "eval": {"ppl_sources": sources}}


def test_unchanged_texts_leave_nothing_to_report(tmp_path):
    calib, heldout = texts_of(tmp_path)
    exp = composed(f"calib.path={calib}", f"eval.ppl_datasets=[{heldout},heldout]")
    assert provenance.changed_texts(record_of(exp), exp) == []


def test_an_edited_text_and_a_removed_one_are_each_named(tmp_path):
    calib, heldout = texts_of(tmp_path)
    exp = composed(f"calib.path={calib}", f"eval.ppl_datasets=[{heldout}]")
    rec = record_of(exp)
    before = rec["calibration"]["text"]["sha256"]
    calib.write_text("other words\n" * 50)
    heldout.unlink()
    changes = provenance.changed_texts(rec, exp)
    assert changes == [
        f"eval.ppl_datasets entry 'mine' ({heldout}) is gone",
        f"the calibration text ({calib}) has changed (sha256 {before[:12]} then, "
        f"{text_source(calib)['sha256'][:12]} now)",
    ]


def test_records_without_a_text_hash_and_hub_datasets_are_not_checked(tmp_path):
    calib, _ = texts_of(tmp_path)
    exp = composed(f"calib.path={calib}", "eval.ppl_datasets=[wikitext2]")
    calib.write_text("changed\n")
    # Written before calibration.text existed; WikiText-2 is named by the hub, not hashed.
    assert provenance.changed_texts({"calibration": {}, "eval": {"ppl_sources": {"wikitext2": {}}}}, exp) == []
    assert provenance.calibration_text(composed("calib=paper", "calib.seq_len=512").calib) is None


def test_replaced_weights_are_named_and_a_copy_of_the_same_weights_is_not(tiny_checkpoint, tmp_path):
    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    exp = composed(f"model.name_or_path={model}")
    rec = {"model_source": {"fingerprint": provenance.model_fingerprint(str(model))}, "calibration": {}}
    (weights,) = model.glob("*.safetensors")
    os.utime(weights, (0, 0))  # another clone or machine: other mtimes, the same bytes
    assert provenance.changed_inputs(rec, exp) == []

    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one weight's last byte
    weights.write_bytes(bytes(data))
    (change,) = provenance.changed_inputs(rec, exp)
    assert change.startswith(f"the model's weights or config ({model}) have changed (fingerprint ")

    shutil.rmtree(model)  # weights not here say nothing about the record
    assert provenance.changed_inputs(rec, exp) == []


def test_the_weights_compared_are_the_ones_from_pretrained_loads():
    tiny = composed().model
    assert provenance.loaded_model(tiny) == tiny.name_or_path
    cached = composed("model=smollm2-135m").model
    assert provenance.loaded_model(cached) == str(model_dir(cached.cache))


def test_a_record_from_another_commit_is_reused_and_the_skip_names_both_commits():
    then, now = "a" * 40, "b" * 40
    assert provenance.code_moved({"git_sha": then}, now) == "recorded at commit aaaaaaaaa, the code is now at bbbbbbbbb"
    assert provenance.code_moved({"git_sha": then}, then) is None
    assert provenance.code_moved({"git_sha": None}, now) is None  # run outside a git checkout
    assert provenance.code_moved({"git_sha": then}, None) is None


def test_a_record_made_with_uncommitted_code_says_so_when_it_is_reused():
    sha = "a" * 40
    one = {"git_sha": sha, "git_uncommitted": ["latmix/mx.py"]}
    assert provenance.code_moved(one, sha) == "made with uncommitted changes to latmix/mx.py"
    many = {"git_sha": sha, "git_uncommitted": [f"latmix/m{i}.py" for i in range(5)]}
    assert provenance.code_moved(many, "b" * 40) == (
        "recorded at commit aaaaaaaaa, the code is now at bbbbbbbbb; "
        "made with uncommitted changes to latmix/m0.py, latmix/m1.py, latmix/m2.py and 2 more"
    )
    assert provenance.code_moved({"git_sha": sha, "git_uncommitted": []}, sha) is None
