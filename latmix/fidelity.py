"""How far a model's next-token distribution is from a reference model's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["function_deviation", "logit_deviation", "next_token_kl", "perplexity"]


def next_token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(ref || model) of the next-token distributions; differentiable in `logits`."""
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ in shape")
    log_p = F.log_softmax(logits.float().flatten(0, -2), dim=-1)
    log_ref = F.log_softmax(ref_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(log_p, log_ref, log_target=True, reduction="batchmean")


def perplexity(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """exp of the mean next-token cross-entropy of input_ids under logits (batch, seq, vocab)."""
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten())
    return float(torch.exp(loss))


def logit_deviation(logits: torch.Tensor, ref_logits: torch.Tensor, input_ids: torch.Tensor) -> dict[str, float]:
    """kl, max_rel_logit_error (max |diff| / max |ref|), ppl and ref_ppl of one batch of logits."""
    diff = (logits.float() - ref_logits.float()).abs().max()
    return {
        "kl": float(next_token_kl(logits, ref_logits)),
        "max_rel_logit_error": float(diff / ref_logits.float().abs().max()),
        "ppl": perplexity(logits, input_ids),
        "ref_ppl": perplexity(ref_logits, input_ids),
    }


@torch.no_grad()
def function_deviation(model: nn.Module, ref_model: nn.Module, input_ids: torch.Tensor) -> dict[str, float]:
    """logit_deviation of model vs ref_model on input_ids (batch, seq), both run as they are configured."""
    ids = input_ids.to(next(model.parameters()).device)
    logits = model(ids).logits
    ref_logits = ref_model(ids.to(next(ref_model.parameters()).device)).logits.to(logits.device)
    return logit_deviation(logits, ref_logits, ids)
