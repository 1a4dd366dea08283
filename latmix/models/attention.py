"""A latmix step inside transformers' attention, between the projections and the scores.

transformers runs attention through a registry of functions chosen by name
(`config._attn_implementation`; masks likewise through AttentionMaskInterface). `install(model)`
registers "latmix_<base>" for the model's implementation and switches the model to it. That function
looks for the latmix module attached to the attention module it is called for (`attach`, one
documented attribute, `latmix_attention`, a latmix-owned nn.Module so it moves and saves with its
block) and, where there is one, passes (query, key, value) through it before the base implementation
runs: latmix.quantize uses it to rotate q and k after RoPE and to quantize the KV cache.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

__all__ = ["ATTRIBUTE", "attach", "attached", "install"]

# The one attribute latmix sets on a transformers attention module.
ATTRIBUTE = "latmix_attention"


def attach(attention: nn.Module, step: nn.Module) -> None:
    """Run `step(query, key, value) -> (query, key, value)` inside this attention module (once installed)."""
    setattr(attention, ATTRIBUTE, step)


def attached(attention: nn.Module) -> nn.Module | None:
    return getattr(attention, ATTRIBUTE, None)


def _latmix_attention(base: str) -> Callable:
    def attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
        step = attached(module)
        if step is not None:
            query, key, value = step(query, key, value)
        base_attention = ALL_ATTENTION_FUNCTIONS.get_interface(base, eager_attention_forward)
        return base_attention(module, query, key, value, attention_mask, **kwargs)

    return attention


def install(model: nn.Module) -> None:
    """Route the model's attention through the attached latmix steps (once per model)."""
    base = model.config._attn_implementation or "eager"
    if base.startswith("latmix_"):
        return
    name = f"latmix_{base}"
    AttentionInterface.register(name, _latmix_attention(base))
    if base in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.config._attn_implementation = name
