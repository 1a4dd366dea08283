"""Evaluation of the in-memory (quantized) model: perplexity and lm-eval zero-shot accuracy.

Perplexity follows GPTQ/QuaRot/FlatQuant: one token stream (WikiText-2 test joined with "\\n\\n"),
cut into non-overlapping windows of seq_len tokens, ppl = exp(mean token NLL over all windows).
Zero-shot tasks run through lm-eval's HFLM wrapped around the model object itself, so what is
evaluated is exactly the model the pipeline built, quantizers and transforms included.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from latmix import data, local_tasks
from latmix.errors import ConfigError
from latmix.fidelity import next_token_nll
from latmix.files import text_source
from latmix.metrics import averages
from latmix.models import input_device
from latmix.settings import LOCAL_PPL_DATASETS, PPL_DATASETS, EvalSettings, ppl_dataset_name

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    ppl: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    averages: dict[str, float | None] = field(default_factory=dict)
    lm_eval_version: str | None = None
    task_versions: dict[str, Any] = field(default_factory=dict)
    # name -> where a perplexity dataset came from (PerplexityText.source), for the record's eval section
    ppl_sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    # task -> its answers item by item (task_items), so that two methods can be compared item for item
    task_items: dict[str, dict[str, str]] = field(default_factory=dict)


def eval_seq_len(model: torch.nn.Module, max_seq_len: int) -> int:
    """min(max_seq_len, the model's context length), as the papers evaluate at 2048."""
    positions = getattr(model.config, "max_position_embeddings", None) or max_seq_len
    return min(max_seq_len, positions)


@torch.no_grad()
def perplexity(model: torch.nn.Module, token_ids: torch.Tensor, seq_len: int, batch_size: int = 1) -> float:
    """exp of the mean next-token NLL over non-overlapping seq_len windows of a 1-D token stream."""
    n_windows = token_ids.numel() // seq_len
    if n_windows == 0:
        raise ConfigError(
            f"the evaluation text has {token_ids.numel()} tokens, fewer than one window of {seq_len}; "
            "lower eval.max_seq_len or use a longer text"
        )
    device = input_device(model)
    windows = token_ids[: n_windows * seq_len].view(n_windows, seq_len)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, n_windows, batch_size):
        batch = windows[start : start + batch_size].to(device)
        total_nll += next_token_nll(model(batch).logits, batch, reduction="sum").item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


@dataclass(frozen=True)
class PerplexityText:
    """One perplexity dataset as evaluated: its record name, its tokens, and where they came from
    (text files: {path, sha256 of the file, tokens, tokens_sha256}; wikitext2: {dataset, tokens,
    tokens_sha256}). tokens_sha256 (data.token_digest of the tokens evaluated) is what pins a hub
    dataset, which is named, not a file to hash, and two records evaluated the same tokens iff it agrees."""

    name: str
    ids: torch.Tensor
    source: dict[str, Any]


def perplexity_texts(tokenizer: Any, settings: EvalSettings, seq_len: int) -> list[PerplexityText]:
    """Every dataset of eval.ppl_datasets tokenized and cut to eval.max_ppl_tokens; a ConfigError naming
    the key if one is shorter than a window of seq_len (call it before calibrating: it fails early)."""
    texts = []
    for entry in settings.ppl_datasets:
        ids, source = _tokens_and_source(tokenizer, entry)
        ids = ids[: settings.max_ppl_tokens]
        if ids.numel() < seq_len:
            where = source.get("path") or entry
            raise ConfigError(
                f"eval.ppl_datasets: {where} has {ids.numel()} tokens (eval.max_ppl_tokens="
                f"{settings.max_ppl_tokens}), fewer than one window of {seq_len}; use a longer text or "
                "lower eval.max_seq_len"
            )
        evaluated = {"tokens": ids.numel(), "tokens_sha256": data.token_digest(ids)}
        texts.append(PerplexityText(ppl_dataset_name(entry), ids, {**source, **evaluated}))
    return texts


def ppl_text_file(entry: str) -> Path | None:
    """The file an eval.ppl_datasets entry reads: an embedded text or a path; None for a hub dataset."""
    if entry in LOCAL_PPL_DATASETS:
        return local_tasks.text_path(entry)
    return None if entry in PPL_DATASETS else Path(entry)


def _tokens_and_source(tokenizer: Any, entry: str) -> tuple[torch.Tensor, dict[str, Any]]:
    path = ppl_text_file(entry)
    if path is None:
        return perplexity_stream(tokenizer, entry), {"dataset": "Salesforce/wikitext wikitext-2-raw-v1 test"}
    raw = path.read_bytes()
    ids = torch.tensor(tokenizer(raw.decode("utf-8"), add_special_tokens=False)["input_ids"], dtype=torch.long)
    return ids, text_source(path, raw)


def perplexity_stream(tokenizer: Any, dataset: str) -> torch.Tensor:
    """The token stream of a named perplexity dataset (wikitext2, or a local text)."""
    if dataset == "wikitext2":
        try:
            return data.token_stream(tokenizer, "wikitext2", "test")
        except ConfigError as err:
            raise ConfigError(
                f"WikiText-2 is not available ({err}). Use eval=local, or put a copy in the Hugging Face "
                "datasets cache (HF_DATASETS_CACHE) on a machine with network first"
            ) from err
    if dataset in LOCAL_PPL_DATASETS:
        return _tokens_and_source(tokenizer, dataset)[0]
    raise ConfigError(
        f"unknown perplexity dataset {dataset!r}; choose from {', '.join(PPL_DATASETS)}"
    )


def task_scores(task_results: Mapping[str, Any]) -> dict[str, float]:
    """lm-eval's '<metric>,<filter>' keys -> {acc, acc_norm, acc_stderr, acc_norm_stderr} where present."""
    scores: dict[str, float] = {}
    for key, value in task_results.items():
        metric = key.split(",")[0]
        if metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr") and isinstance(value, (int, float)):
            scores[metric] = float(value)
    return scores


ITEM_METRICS: tuple[str, ...] = ("acc", "acc_norm")


def task_items(samples: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, str]]:
    """lm-eval's logged samples -> per task, in doc_id order: `docs`, a digest of the items' doc
    hashes (two runs pair only on the same items, in the same order), and for acc and acc_norm one
    character per item, "1" where the model chose the right answer. A task whose samples carry
    neither metric under the unfiltered ("none") responses is left out."""
    items: dict[str, dict[str, str]] = {}
    for task, logged in samples.items():
        ordered = sorted((s for s in logged if s.get("filter", "none") == "none"), key=lambda s: s["doc_id"])
        answers = {
            metric: "".join("1" if sample[metric] else "0" for sample in ordered)
            for metric in ITEM_METRICS
            if ordered and all(metric in sample for sample in ordered)
        }
        if answers:
            docs = hashlib.sha256("\n".join(sample["doc_hash"] for sample in ordered).encode()).hexdigest()
            items[task] = {"docs": docs[:16], **answers}
    return items


def task_manager(settings: EvalSettings) -> Any:
    from lm_eval.tasks import TaskManager

    if settings.suite == "local":
        return TaskManager(include_path=str(local_tasks.materialize_local_tasks()), include_defaults=False)
    return TaskManager()


def zero_shot(model: torch.nn.Module, tokenizer: Any, settings: EvalSettings, seq_len: int) -> dict[str, Any]:
    """lm_eval.simple_evaluate on the in-memory model; returns lm-eval's results dict."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks = list(settings.tasks) if settings.tasks is not None else list(local_tasks.LOCAL_TASKS)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, max_length=seq_len)
    # lm-eval bootstraps stderrs in a fork()ed multiprocessing.Pool unless DISABLE_MULTIPROC is set.
    # Forking a process that has live threads (the run lock's heartbeat, tqdm's monitor) can leave a
    # worker blocked on a lock no thread will release, and the run then hangs at the pool's exit (seen
    # in CI and in the slow tests: a worker stuck in SemLock.__enter__). Serial bootstrapping is cheap.
    with mock.patch.dict(os.environ, {"DISABLE_MULTIPROC": "1"}):
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=settings.num_fewshot,
            limit=settings.limit,
            task_manager=task_manager(settings),
            log_samples=True,
            # acc stderr is closed-form; bootstrapping only matters for metrics we do not report
            bootstrap_iters=1000,
        )


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    settings: EvalSettings,
    texts: list[PerplexityText] | None = None,
) -> EvalResult:
    """Perplexity on each configured dataset, then the zero-shot tasks, with versions for the record.

    texts: the perplexity datasets as perplexity_texts gave them (tokenized early, so that a text too
    short fails before calibration); None tokenizes them here.
    """
    import lm_eval

    model.eval()
    seq_len = eval_seq_len(model, settings.max_seq_len)
    result = EvalResult(lm_eval_version=lm_eval.__version__)
    ppl_batch = settings.batch_size if isinstance(settings.batch_size, int) else 1
    for text in perplexity_texts(tokenizer, settings, seq_len) if texts is None else texts:
        result.ppl[text.name] = perplexity(model, text.ids, seq_len, ppl_batch)
        result.ppl_sources[text.name] = text.source
        log.info("ppl %s = %.3f (seq_len %d)", text.name, result.ppl[text.name], seq_len)
    if settings.tasks == ():
        return result
    output = zero_shot(model, tokenizer, settings, seq_len)
    result.tasks = {task: task_scores(values) for task, values in output["results"].items()}
    result.tasks = {task: scores for task, scores in result.tasks.items() if scores}
    result.task_versions = dict(output.get("versions", {}))
    result.averages = averages(result.tasks)
    result.task_items = task_items(output.get("samples", {}))
    return result
