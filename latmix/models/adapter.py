"""Per-architecture adapters: the only code that knows module names inside a transformers model."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

__all__ = ["ADAPTERS", "LINEAR_ROLES", "LlamaFamilyAdapter", "get_adapter"]

# Abstract names of the seven linears of a decoder block, in the order data reaches them.
LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


class LlamaFamilyAdapter:
    """Llama 2/3/3.x, Qwen2/2.5 and Mistral: pre-norm blocks with RMSNorm, GQA attention, SwiGLU MLP."""

    linear_paths: ClassVar[dict[str, tuple[str, str]]] = {
        "q": ("self_attn", "q_proj"),
        "k": ("self_attn", "k_proj"),
        "v": ("self_attn", "v_proj"),
        "o": ("self_attn", "o_proj"),
        "gate": ("mlp", "gate_proj"),
        "up": ("mlp", "up_proj"),
        "down": ("mlp", "down_proj"),
    }

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # --- sizes -----------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads

    # --- modules ---------------------------------------------------------------------------------
    def layers(self) -> list[nn.Module]:
        return list(self.model.model.layers)

    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.model.embed_tokens

    def set_embed_tokens(self, module: nn.Module) -> None:
        self.model.model.embed_tokens = module

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def set_lm_head(self, module: nn.Module) -> None:
        self.model.lm_head = module

    @property
    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def input_norm(self, layer: nn.Module) -> nn.Module:
        return layer.input_layernorm

    def post_attention_norm(self, layer: nn.Module) -> nn.Module:
        return layer.post_attention_layernorm

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def linear(self, layer: nn.Module, role: str) -> nn.Module:
        parent, name = self.linear_paths[role]
        return getattr(getattr(layer, parent), name)

    def set_linear(self, layer: nn.Module, role: str, module: nn.Module) -> None:
        parent, name = self.linear_paths[role]
        setattr(getattr(layer, parent), name, module)

    def attn_readers(self, layer: nn.Module) -> list[nn.Module]:
        return [self.linear(layer, r) for r in ("q", "k", "v")]

    def attn_writer(self, layer: nn.Module) -> nn.Module:
        return self.linear(layer, "o")

    def value_proj(self, layer: nn.Module) -> nn.Module:
        return self.linear(layer, "v")

    def mlp_readers(self, layer: nn.Module) -> list[nn.Module]:
        return [self.linear(layer, r) for r in ("gate", "up")]

    def mlp_writer(self, layer: nn.Module) -> nn.Module:
        return self.linear(layer, "down")

    def norms_and_readers(self) -> list[tuple[nn.Module, list[nn.Module]]]:
        """Every RMSNorm with the linears that read its output."""
        pairs = []
        for layer in self.layers():
            pairs.append((self.input_norm(layer), self.attn_readers(layer)))
            pairs.append((self.post_attention_norm(layer), self.mlp_readers(layer)))
        pairs.append((self.final_norm, [self.lm_head]))
        return pairs

    # --- surgery ---------------------------------------------------------------------------------
    def untie_embeddings(self) -> None:
        """Give lm_head its own weight (Llama-3.2 ties it to the embedding) so the two can diverge."""
        if self.lm_head.weight is self.embed_tokens.weight:
            self.lm_head.weight = nn.Parameter(self.embed_tokens.weight.detach().clone())
        self.config.tie_word_embeddings = False

    @torch.no_grad()
    def fold_norms(self) -> None:
        """RMSNorm weight -> columns of its readers, norm weight -> 1 (exact). Unties embeddings first."""
        self.untie_embeddings()
        for norm, readers in self.norms_and_readers():
            for linear in readers:
                linear.weight.mul_(norm.weight.to(linear.weight.dtype))
            norm.weight.fill_(1.0)


ADAPTERS: dict[str, type[LlamaFamilyAdapter]] = {
    "llama": LlamaFamilyAdapter,
    "qwen2": LlamaFamilyAdapter,
    "mistral": LlamaFamilyAdapter,
}


def get_adapter(model: nn.Module) -> LlamaFamilyAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"no adapter for model_type {model_type!r}; supported: {sorted(ADAPTERS)}. "
            "Add an adapter in latmix/models/ for this architecture."
        )
    return ADAPTERS[model_type](model)
