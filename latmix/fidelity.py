"""How far a model's next-token distribution is from a reference model's.

The full-precision deviation of DESIGN.md is measured here, one way: the original model's logits on
a few sequences are kept once (`Reference.of`, before the model is transformed), and `deviation`
compares a model's logits on the same sequences with them (KL, max relative logit error, and both
perplexities).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from latmix.models import input_device

__all__ = ["Reference", "deviation", "logit_deviation", "next_token_kl", "next_token_nll"]


# Rows (tokens) per chunk of next_token_kl: about 2^25 float32 logits, 128 MiB, whatever the vocabulary.
KL_CHUNK_ELEMENTS = 2**25
# Above this many logits (512 MiB of float32) the chunks are recomputed in the backward instead of
# keeping their log-probabilities; below it the recomputation costs more time than the memory is worth
# (SmolLM2's calibration batch, 4 x 256 x 49152 logits: KL forward + backward 0.46 s kept, 0.8-1.1 s
# recomputed, on 2 CPU threads).
KL_RECOMPUTE_ELEMENTS = 2**27


def next_token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(ref || model) of the next-token distributions; differentiable in `logits`.

    Computed over chunks of tokens, so that no float32 tensor of every token's vocabulary-sized
    distribution is ever whole: for Llama-3-8B's 128256 words and 4 x 2048 tokens each such tensor is
    3.9 GiB, and the whole-tensor form held about five at once. Under autograd, past
    KL_RECOMPUTE_ELEMENTS logits, each chunk is recomputed in the backward (a checkpoint) instead of
    keeping its log-probabilities. Every token's terms and every gradient are the unchunked
    computation's bits; only the order of the loss's final sum differs.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ in shape")
    rows, ref_rows = logits.flatten(0, -2), ref_logits.flatten(0, -2)
    chunk = max(1, KL_CHUNK_ELEMENTS // rows.shape[-1])
    recompute = torch.is_grad_enabled() and rows.requires_grad and rows.numel() > KL_RECOMPUTE_ELEMENTS
    total = sum(
        checkpoint(_kl_sum, part, ref_part, use_reentrant=False) if recompute else _kl_sum(part, ref_part)
        for part, ref_part in zip(rows.split(chunk), ref_rows.split(chunk), strict=True)
    )
    return total / rows.shape[0]


def _kl_sum(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL(ref || model), in float32."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_ref = F.log_softmax(ref_logits.float(), dim=-1)
    return F.kl_div(log_p, log_ref, log_target=True, reduction="sum")


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each next token of input_ids (batch, seq) under logits (batch, seq, vocab), in float32."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction=reduction)


def logit_deviation(logits: torch.Tensor, ref_logits: torch.Tensor, input_ids: torch.Tensor) -> dict[str, float]:
    """kl, max_rel_logit_error (max |diff| / max |ref|), ppl and ref_ppl of one batch of logits."""
    diff = (logits.float() - ref_logits.float()).abs().max()
    return {
        "kl": float(next_token_kl(logits, ref_logits)),
        "max_rel_logit_error": float(diff / ref_logits.float().abs().max()),
        "ppl": float(torch.exp(next_token_nll(logits, input_ids))),
        "ref_ppl": float(torch.exp(next_token_nll(ref_logits, input_ids))),
    }


@torch.no_grad()
def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's float32 logits on input_ids, on the CPU."""
    return model(input_ids.to(input_device(model))).logits.float().cpu()


@dataclass(frozen=True)
class Reference:
    """The original model's logits on a few short sequences (on the CPU): what deviations are measured against."""

    input_ids: torch.Tensor
    logits: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module, input_ids: torch.Tensor) -> Reference:
        return cls(input_ids.cpu(), _logits(model, input_ids))


def deviation(model: nn.Module, reference: Reference) -> dict[str, float]:
    """logit_deviation of the model, run as it is configured, from the reference on the reference's ids."""
    return logit_deviation(_logits(model, reference.input_ids), reference.logits, reference.input_ids)
