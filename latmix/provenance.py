"""What a run read, by content, and whether a recorded run's inputs are still the ones its config names.

A run's id hashes its config (latmix.record.run_id), not the files the config names, so a calibration
or perplexity text edited in place, or a model directory whose weights were replaced, keeps its id, and
the run would be skipped as recorded with numbers from the old inputs. The record keeps each text's
sha256 (`calibration.text`, `eval.ppl_sources`) and the weights' fingerprint by content
(`model_source.fingerprint`: models.loading.weights_fingerprint without mtimes); before a recorded run
is reused they are computed again from what the config names now and compared. Hub datasets (WikiText-2,
C4) are recorded by name and by the digest of the tokens a run read (`eval.ppl_sources.*.tokens_sha256`,
`calibration.data_sha256`), but not read again before a reuse, which would mean loading them; a record
written before a field existed is not checked on that input.
The code is not an input here: a recorded run is reused across commits, and the skip says so
(code_moved), since refusing every record after each commit would make a results directory useless.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from latmix.data import local_text_file
from latmix.evaluate import ppl_text_file
from latmix.files import sha256_file, text_source
from latmix.models.cache import model_dir
from latmix.models.loading import model_directory, weights_fingerprint
from latmix.settings import CalibConfig, Experiment, ModelSettings, ppl_dataset_name


def calibration_text(calib: CalibConfig) -> dict[str, str] | None:
    """The calibration text's source (text_source), or None for a hub dataset."""
    return text_source(local_text_file("train", calib.path)) if calib.source == "local" else None


def loaded_model(model: ModelSettings) -> str:
    """What from_pretrained loads for these settings: the cache entry's directory, or name_or_path."""
    return str(model_dir(model.cache)) if model.cache is not None else model.name_or_path


def model_fingerprint(name_or_path: str) -> str:
    """The weights and config of what from_pretrained loads, by content (size, edges, manifest hashes)."""
    return weights_fingerprint(name_or_path, with_mtime=False)


def changed_inputs(rec: Mapping[str, Any], exp: Experiment) -> list[str]:
    """One clause per input the record fingerprinted that differs now: texts, then the weights."""
    changes = changed_texts(rec, exp)
    recorded = rec.get("model_source", {}).get("fingerprint")
    name = loaded_model(exp.model)
    # Weights not here (a cache entry removed, a hub id not downloaded) say nothing about the record.
    if recorded is None or model_directory(name) is None:
        return changes
    if (now := model_fingerprint(name)) != recorded:
        changes.append(
            f"the model's weights or config ({name}) have changed (fingerprint {recorded} then, {now} now)"
        )
    return changes


def code_moved(rec: Mapping[str, Any], now: str | None) -> str | None:
    """A clause naming the commit a recorded run ran at, when the code (commit `now`) has moved since,
    and the code files it ran with uncommitted; None when neither applies (or the commits are unknown)."""
    then = rec.get("git_sha")
    clauses = []
    if then is not None and now is not None and then != now:
        clauses.append(f"recorded at commit {then[:9]}, the code is now at {now[:9]}")
    if uncommitted := rec.get("git_uncommitted"):
        shown = ", ".join(uncommitted[:3]) + (f" and {len(uncommitted) - 3} more" if len(uncommitted) > 3 else "")
        clauses.append(f"made with uncommitted changes to {shown}")
    return "; ".join(clauses) or None


def changed_texts(rec: Mapping[str, Any], exp: Experiment) -> list[str]:
    """One clause per text the record hashed whose file, as the config names it now, differs or is gone."""
    changes = []
    for what, path, source in _hashed_texts(rec, exp):
        if not path.is_file():
            changes.append(f"{what} ({path}) is gone")
        elif (now := sha256_file(path)) != source["sha256"]:
            changes.append(
                f"{what} ({path}) has changed (sha256 {source['sha256'][:12]} then, {now[:12]} now)"
            )
    return changes


def _hashed_texts(rec: Mapping[str, Any], exp: Experiment) -> list[tuple[str, Path, Mapping[str, Any]]]:
    """(what the config calls it, the file it names now, the record's source) for each text both know."""
    ppl_sources = rec.get("eval", {}).get("ppl_sources", {})
    named = [
        (
            f"eval.ppl_datasets entry {ppl_dataset_name(e)!r}",
            ppl_text_file(e),
            ppl_sources.get(ppl_dataset_name(e)),
        )
        for e in exp.eval.ppl_datasets
    ]
    if exp.calib.source == "local":
        named.append(
            ("the calibration text", local_text_file("train", exp.calib.path), rec["calibration"].get("text"))
        )
    return [
        (what, path, source)
        for what, path, source in named
        if path is not None and isinstance(source, Mapping) and "sha256" in source
    ]
