"""Evaluation: the GPTQ/QuaRot perplexity convention, lm-eval parsing, the papers' averages, local tasks."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from latmix import data, evaluate, local_tasks, metrics
from latmix.errors import ConfigError
from latmix.settings import EvalSettings, from_values


class FixedLogits(torch.nn.Module):
    """A language model stand-in whose next-token logits come from a function of the input ids."""

    def __init__(self, logits_of, max_positions: int = 4096) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.logits_of = logits_of
        self.config = SimpleNamespace(max_position_embeddings=max_positions)

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits_of(ids))


def test_a_uniform_model_has_perplexity_equal_to_the_vocabulary_size():
    model = FixedLogits(lambda ids: torch.zeros(*ids.shape, 50))
    assert evaluate.perplexity(model, torch.randint(0, 50, (1000,)), seq_len=100) == pytest.approx(50)


def test_a_model_that_knows_the_next_token_has_perplexity_one():
    model = FixedLogits(lambda ids: 100.0 * torch.nn.functional.one_hot((ids + 1) % 10, 10).float())
    assert evaluate.perplexity(model, torch.arange(1000) % 10, seq_len=64) == pytest.approx(1.0)


def test_windows_do_not_overlap_and_the_remainder_is_dropped():
    seen = []

    def record_windows(ids):
        seen.append(ids.clone())
        return torch.zeros(*ids.shape, 250)

    evaluate.perplexity(FixedLogits(record_windows), torch.arange(250), seq_len=100, batch_size=1)
    assert [w[0, 0].item() for w in seen] == [0, 100]
    assert all(w.shape == (1, 100) for w in seen)


def test_too_short_a_text_asks_for_a_shorter_window():
    with pytest.raises(ValueError, match=r"lower eval\.max_seq_len"):
        evaluate.perplexity(FixedLogits(lambda ids: torch.zeros(*ids.shape, 8)), torch.arange(10), seq_len=64)


def test_evaluation_length_is_capped_by_the_model_context():
    assert evaluate.eval_seq_len(FixedLogits(None, max_positions=256), 2048) == 256
    assert evaluate.eval_seq_len(FixedLogits(None, max_positions=8192), 2048) == 2048


def test_lm_eval_metric_keys_are_parsed():
    raw = {"alias": "piqa", "acc,none": 0.8, "acc_stderr,none": 0.01, "acc_norm,none": 0.81,
           "acc_norm_stderr,none": "N/A", "perplexity,none": 3.2}
    assert evaluate.task_scores(raw) == {"acc": 0.8, "acc_stderr": 0.01, "acc_norm": 0.81}


def test_averages_follow_the_papers():
    tasks = {name: {"acc": 0.5} for name in metrics.AVG8_TASKS + metrics.AVG6_TASKS}
    tasks["hellaswag"] = {"acc": 0.4, "acc_norm": 0.6}  # acc_norm where it exists
    averages = metrics.averages(tasks)
    assert averages["avg6"] == pytest.approx((5 * 0.5 + 0.6) / 6)
    assert averages["avg8"] == pytest.approx((7 * 0.5 + 0.6) / 8)
    del tasks["lambada_openai"]
    assert metrics.averages(tasks)["avg6"] is None  # never an average over a partial suite
    assert metrics.averages(tasks)["avg8"] is not None


def test_wikitext_without_network_says_to_use_local_evaluation(monkeypatch):
    def offline(*_args, **_kwargs):
        raise ConfigError("could not load 'wikitext2'")

    monkeypatch.setattr(evaluate.data, "token_stream", offline)
    with pytest.raises(ConfigError, match="Use eval=local"):
        evaluate.perplexity_stream(None, "wikitext2")


def test_unknown_perplexity_datasets_are_named():
    with pytest.raises(ValueError, match="unknown perplexity dataset 'c5'"):
        evaluate.perplexity_stream(None, "c5")


@pytest.mark.slow
def test_local_suite_runs_lm_eval_on_the_in_memory_model(tiny_checkpoint):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    settings = EvalSettings(suite="local", tasks=None, ppl_datasets=("heldout",), max_seq_len=128,
                            batch_size=8, max_ppl_tokens=4096, limit=8, num_fewshot=0)
    result = evaluate.evaluate(model, tokenizer, settings)
    assert set(result.tasks) == set(local_tasks.LOCAL_TASKS)
    assert all(0.0 <= scores["acc"] <= 1.0 for scores in result.tasks.values())
    assert "acc_norm" in result.tasks["tiny_hellaswag"]
    assert math.isfinite(result.ppl["heldout"]) and result.ppl["heldout"] > 1
    assert result.averages["mean"] is not None and result.averages["avg6"] is None
    assert set(result.task_versions) >= set(local_tasks.LOCAL_TASKS)
    assert result.lm_eval_version
    # the answers item by item, for paired comparisons: 8 items each, agreeing with the accuracies
    assert set(result.task_items) == set(local_tasks.LOCAL_TASKS)
    for task, entry in result.task_items.items():
        for metric in ("acc", "acc_norm"):
            if metric in result.tasks[task]:
                assert len(entry[metric]) == 8
                assert entry[metric].count("1") / 8 == pytest.approx(result.tasks[task][metric])


# --- perplexity on any text file -----------------------------------------------------------------


def byte_tokenizer(text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
    """One token per UTF-8 byte."""
    return {"input_ids": list(text.encode("utf-8"))}


def eval_settings(*datasets, **overrides) -> EvalSettings:
    values = {"suite": "local", "tasks": (), "ppl_datasets": datasets, "max_seq_len": 64, "max_ppl_tokens": None}
    return from_values(EvalSettings, {**values, **overrides}, "eval")


def test_a_text_file_is_evaluated_and_recorded_by_name_path_and_sha256(tmp_path):
    import hashlib

    text = tmp_path / "my_corpus.txt"
    text.write_text("ünïcode text, " * 40, encoding="utf-8")
    settings = eval_settings(str(text), "heldout", max_ppl_tokens=5000)
    assert settings.ppl_datasets == (str(text.resolve()), "heldout")
    model = FixedLogits(lambda ids: torch.zeros(*ids.shape, 256))
    result = evaluate.evaluate(model, byte_tokenizer, settings)
    assert set(result.ppl) == {"my_corpus", "heldout"} and result.ppl["my_corpus"] == pytest.approx(256, rel=1e-5)
    tokens = len(text.read_bytes())
    assert result.ppl_sources["my_corpus"] == {
        "path": str(text.resolve()), "sha256": hashlib.sha256(text.read_bytes()).hexdigest(), "tokens": tokens,
        "tokens_sha256": data.token_digest(torch.tensor(list(text.read_bytes()))),
    }
    heldout = result.ppl_sources["heldout"]
    assert heldout["path"] == str(local_tasks.text_path("heldout")) and heldout["tokens"] == 5000


def test_a_hub_dataset_is_recorded_by_name_and_by_the_digest_of_the_tokens_evaluated(monkeypatch):
    streams = iter([torch.arange(300) % 256, torch.arange(300) % 256, (torch.arange(300) + 1) % 256])
    monkeypatch.setattr(data, "token_stream", lambda tokenizer, source, split: next(streams))
    settings = eval_settings("wikitext2", max_ppl_tokens=200)

    first, again, edited = (evaluate.perplexity_texts(byte_tokenizer, settings, seq_len=64)[0] for _ in range(3))

    assert first.source == {"dataset": "Salesforce/wikitext wikitext-2-raw-v1 test", "tokens": 200,
                            "tokens_sha256": data.token_digest(torch.arange(200))}
    assert again.source == first.source  # the same tokens, the same record
    assert edited.source["tokens_sha256"] != first.source["tokens_sha256"]  # a new dataset revision shows


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"eval: eval\.ppl_datasets: unknown '.*missing\.txt': neither a dataset .* nor an existing text file"),
        (b"\xff\xfe latin-1 \xe9", r"eval: eval\.ppl_datasets: .*bad\.txt is not UTF-8 text \(byte 0"),
        (b" \n\n ", r"eval: eval\.ppl_datasets: .*bad\.txt has no text"),
    ],
)
def test_a_missing_unreadable_or_empty_file_is_one_config_error_naming_the_key(tmp_path, content, message):
    path = tmp_path / ("missing.txt" if content is None else "bad.txt")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as caught:
        eval_settings(str(path))
    assert "\n" not in str(caught.value)


def test_two_texts_recorded_under_one_name_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    for folder in (tmp_path, tmp_path / "a"):
        (folder / "heldout.txt").write_text("text", encoding="utf-8")
    with pytest.raises(ConfigError, match="more than one entry would be recorded as heldout"):
        eval_settings(str(tmp_path / "heldout.txt"), str(tmp_path / "a" / "heldout.txt"))
    with pytest.raises(ConfigError, match="recorded as heldout"):
        eval_settings("heldout", str(tmp_path / "heldout.txt"))


def test_a_text_too_short_for_one_window_fails_when_tokenized(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("only a few bytes", encoding="utf-8")
    settings = eval_settings(str(path))
    with pytest.raises(ConfigError, match=r"eval\.ppl_datasets: .*short\.txt has 16 tokens .* fewer than one window of 64"):
        evaluate.perplexity_texts(byte_tokenizer, settings, seq_len=64)


def test_lm_eval_bootstraps_without_forking_a_pool(monkeypatch):
    # A fork()ed multiprocessing.Pool in a process with live threads hung a run at the pool's exit.
    import lm_eval
    import lm_eval.models.huggingface as huggingface

    seen = {}
    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    monkeypatch.setattr(huggingface, "HFLM", lambda **kwargs: kwargs)
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: seen.update(env=os.environ.get("DISABLE_MULTIPROC")))
    settings = EvalSettings(suite="local", tasks=("tiny_lambada",), ppl_datasets=(), limit=2)
    evaluate.zero_shot(None, None, settings, 128)
    assert seen == {"env": "1"} and "DISABLE_MULTIPROC" not in os.environ  # set for the call only
