"""scripts/train_tiny_model.py: the embedded tiny Llama, trained under a wall-clock budget, resumably.

The end-to-end tests train on a few KB of generated text for six seconds (--max-minutes 0.1) at
sequence length 32; the schedule tests need no model.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import load_script
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

train_tiny = load_script("train_tiny_model")

TINY_RUN = ["--max-minutes", "0.1", "--seq-len", "32", "--batch-size", "2", "--vocab-size", "300",
            "--threads", "1"]
WORDS = ("the", "a", "her", "his", "their", "of", "to", "in", "with", "from", "by", "upon", "and", "but",
         "yet", "when", "while", "because", "lady", "sister", "brother", "father", "king", "queen",
         "castle", "garden", "letter", "morning", "evening", "house", "river", "walked", "spoke", "wrote",
         "read", "answered", "thought", "loved", "feared", "carried", "opened", "closed", "remembered",
         "quiet", "bright", "dark", "gentle", "proud", "strange", "little", "ancient", "honest", "patient",
         "cold", "warm")


def write_corpus(root: Path) -> Path:
    """<root>/train/*.txt and <root>/validation/*.txt: sentences of random words, a few KB per file."""
    rng = random.Random(0)

    def paragraph(n_sentences: int) -> str:
        sentences = []
        for _ in range(n_sentences):
            words = rng.choices(WORDS, k=rng.randint(5, 12))
            sentences.append(" ".join(words).capitalize() + rng.choice(".,;!?"))
        return " ".join(sentences) + "\n"

    for split, names in {"train": ("austen", "milton", "shakespeare"), "validation": ("macbeth",)}.items():
        (root / split).mkdir(parents=True)
        for name in names:
            (root / split / f"{name}.txt").write_text("".join(paragraph(8) for _ in range(6)))
    return root


def run_args(tmp: Path, corpus: Path, *extra: str) -> list[str]:
    return ["--corpus", str(corpus), "--out", str(tmp / "model"), "--checkpoint", str(tmp / "ckpt.pt"),
            *TINY_RUN, *extra]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """main() sets the process-wide torch thread count; the rest of the session keeps its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The output folder of one uninterrupted tiny run."""
    tmp = tmp_path_factory.mktemp("train_tiny")
    threads = torch.get_num_threads()
    try:
        train_tiny.main(run_args(tmp, write_corpus(tmp / "corpus")))
    finally:
        torch.set_num_threads(threads)
    return tmp / "model"


def read_log(out: Path) -> dict:
    return json.loads((out / "training_log.json").read_text())


# The learning-rate schedule.

def test_warmup_rises_linearly_from_zero_to_the_peak():
    peak, warmup = 2e-3, 0.1
    lrs = [train_tiny.learning_rate(p, peak, warmup=warmup, floor=0.05) for p in (0.0, 0.025, 0.05, 0.1)]
    assert lrs == pytest.approx([0.0, peak / 4, peak / 2, peak])


def test_after_warmup_the_rate_only_falls_and_ends_at_floor_times_peak():
    peak, warmup, floor = 2e-3, 0.03, 0.05
    grid = [warmup + (1 - warmup) * i / 200 for i in range(201)]
    lrs = [train_tiny.learning_rate(p, peak, warmup=warmup, floor=floor) for p in grid]
    assert all(later <= earlier for earlier, later in itertools.pairwise(lrs))
    assert lrs[0] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(floor * peak)
    assert train_tiny.learning_rate(1.5, peak, warmup=warmup, floor=floor) == pytest.approx(floor * peak)


def test_the_schedule_follows_whichever_of_steps_and_wall_clock_is_further_along():
    budget = 100.0
    assert train_tiny.Progress(step=50, planned_steps=100, elapsed=10.0).fraction(budget) == 0.5
    assert train_tiny.Progress(step=50, planned_steps=100, elapsed=80.0).fraction(budget) == 0.8
    # Before the throughput probe has planned the steps, only the clock counts.
    assert train_tiny.Progress(step=12, planned_steps=None, elapsed=30.0).fraction(budget) == 0.3


def test_the_throughput_probe_times_the_steps_between_its_first_and_last():
    probe = train_tiny.ThroughputProbe(first=5, last=15)
    readings = [probe.seconds_per_step(step, elapsed=10.0 + 0.5 * step) for step in range(20)]
    assert readings[15] == pytest.approx(0.5)
    assert [r for i, r in enumerate(readings) if i != 15] == [None] * 19


# An uninterrupted run.

@pytest.mark.slow
def test_the_saved_folder_loads_offline_with_bf16_weights_and_the_trained_tokenizer(trained):
    assert {w.dtype for w in load_file(trained / "model.safetensors").values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(trained)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert len(tokenizer) == model.config.vocab_size == 300
    text = "The quiet lady wrote a letter to her brother."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == text
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.slow
def test_the_log_records_a_run_that_trained_within_its_budget(trained):
    log = read_log(trained)
    assert set(log) == {"args", "config", "n_params", "baselines", "train_tokens", "val_tokens", "env",
                        "curve", "val", "planned_steps", "final"}
    final = log["final"]
    assert 0 < final["steps"] <= log["planned_steps"]
    assert final["minutes"] <= 0.1 + 0.02
    assert final["tokens_seen"] == final["steps"] * 2 * 32
    assert final["dtype"] == "bfloat16"
    assert math.isfinite(final["val_ppl"])
    # Six seconds of training on repetitive text beats an untrained model by far.
    assert final["val_ppl"] < log["baselines"]["untrained_val_ppl"] / 2
    assert [point["step"] for point in log["curve"]] == list(range(10, final["steps"] + 1, 10))
    assert "resumed" not in log


@pytest.mark.slow
def test_the_model_card_states_the_final_validation_perplexity(trained):
    card = (trained / "README.md").read_text()
    assert f"| this model | {read_log(trained)['final']['val_ppl']:.2f} |" in card


@pytest.mark.slow
def test_the_manifest_lists_the_sha256_of_every_other_file(trained):
    manifest = json.loads((trained / "MANIFEST.json").read_text())["files"]
    on_disk = {p.name for p in trained.iterdir() if p.is_file()} - {"MANIFEST.json"}
    assert set(manifest) == on_disk
    assert {"model.safetensors", "training_log.json", "README.md"} <= on_disk
    for name, digest in manifest.items():
        assert hashlib.sha256((trained / name).read_bytes()).hexdigest() == digest, name


# A run interrupted after a checkpoint, then started again.

class Killed(Exception):
    """Stands for the process dying right after it wrote a checkpoint."""


@pytest.mark.slow
def test_a_run_started_again_after_a_kill_continues_from_the_checkpoint(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    real_write_checkpoint = train_tiny.write_checkpoint

    def write_at_step_20_then_die(path, model, optimizer, generator, data, progress, log):
        # Checkpointing every step would cost more than the training: only step 20 is written.
        if progress.step == 20:
            real_write_checkpoint(path, model, optimizer, generator, data, progress, log)
            raise Killed

    monkeypatch.setattr(train_tiny, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(train_tiny, "write_checkpoint", write_at_step_20_then_die)
    with pytest.raises(Killed):
        train_tiny.main(run_args(tmp_path, corpus))
    assert (tmp_path / "ckpt.pt").exists()
    assert not (tmp_path / "model").exists()

    monkeypatch.undo()
    # A changed --vocab-size must not matter: the checkpoint's tokenizer is reused.
    train_tiny.main(run_args(tmp_path, corpus, "--vocab-size", "280"))
    log = read_log(tmp_path / "model")
    assert [entry["step"] for entry in log["resumed"]] == [20]
    assert log["resumed"][0]["args"]["vocab_size"] == 300
    assert log["args"]["vocab_size"] == 280
    assert len(AutoTokenizer.from_pretrained(tmp_path / "model")) == log["config"]["vocab_size"] == 300
    # The curve and baselines of the killed run are kept, and the step count carries on from 20.
    assert log["baselines"]["untrained_val_ppl"] > 0
    assert 20 < log["final"]["steps"] <= log["planned_steps"]
    assert [point["step"] for point in log["curve"]] == list(range(10, log["final"]["steps"] + 1, 10))
