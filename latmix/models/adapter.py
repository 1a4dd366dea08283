"""Per-architecture adapters: module names and sizes inside a transformers model, and norm folding.

An adapter maps the abstract roles of latmix (the seven linears of a block, LINEAR_ROLES, the norms,
the embedding and lm_head) onto a model's modules, reads its sizes from its config, and folds RMSNorm
weights into the linears that read them. Adapters are chosen by config.model_type.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from latmix.settings import LINEAR_ROLES

__all__ = ["ADAPTERS", "LINEAR_ROLES", "LlamaFamilyAdapter", "get_adapter", "head_dim", "model_dimensions"]


def head_dim(config: Any) -> int:
    """The attention head size: the config's head_dim where it has one, else hidden_size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


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
        return head_dim(self.config)

    @staticmethod
    def input_dims_of(config: Any) -> dict[str, tuple[str, int]]:
        """role -> (the config's name for the linear's input size, that size): what MX blocks must divide."""
        attention_out = ("num_attention_heads * head_dim", config.num_attention_heads * head_dim(config))
        hidden = ("hidden_size", config.hidden_size)
        return {
            "q": hidden, "k": hidden, "v": hidden, "o": attention_out,
            "gate": hidden, "up": hidden, "down": ("intermediate_size", config.intermediate_size),
        }

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


def _adapter_class(config: Any) -> type[LlamaFamilyAdapter]:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"no adapter for model_type {model_type!r}; supported: {sorted(ADAPTERS)}. "
            "Add an adapter in latmix/models/ for this architecture."
        )
    return ADAPTERS[model_type]


def get_adapter(model: nn.Module) -> LlamaFamilyAdapter:
    return _adapter_class(getattr(model, "config", None))(model)


def model_dimensions(config: Any) -> tuple[dict[str, tuple[str, int]], int]:
    """(input size of every linear role, head_dim) from a model config, before any weight is loaded."""
    return _adapter_class(config).input_dims_of(config), head_dim(config)
