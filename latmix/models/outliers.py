"""A function-preserving reparametrization that gives a model massive activation channels."""

from __future__ import annotations

import torch
from torch import nn

from latmix.models.adapter import get_adapter

__all__ = ["inject_channel_outliers"]


@torch.no_grad()
def inject_channel_outliers(model: nn.Module, n_channels: int, scale: float, seed: int) -> torch.Tensor:
    """Scale chosen RMSNorm weight channels up by `scale` and their readers' columns down by it.

    Applied to every decoder block's two norms (the same channels everywhere, like real massive
    activations). Logits are unchanged; the activations the quantized linears see get outlier channels.
    Returns the chosen channel indices.
    """
    adapter = get_adapter(model)
    if not 0 < n_channels <= adapter.hidden_size:
        raise ValueError(f"n_channels must be in [1, hidden_size={adapter.hidden_size}], got {n_channels}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    generator = torch.Generator().manual_seed(seed)
    channels = torch.randperm(adapter.hidden_size, generator=generator)[:n_channels]
    for layer in adapter.layers():
        for norm, readers in (
            (adapter.input_norm(layer), adapter.attn_readers(layer)),
            (adapter.post_attention_norm(layer), adapter.mlp_readers(layer)),
        ):
            norm.weight[channels.to(norm.weight.device)] *= scale
            for linear in readers:
                linear.weight[:, channels.to(linear.weight.device)] /= scale
    return channels
