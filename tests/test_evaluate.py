"""Evaluation: the GPTQ/QuaRot perplexity convention, lm-eval parsing, the papers' averages, local tasks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from latmix import evaluate, local_tasks, metrics
from latmix.errors import ConfigError
from latmix.settings import EvalSettings


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
