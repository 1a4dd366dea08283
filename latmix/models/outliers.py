"""A function-preserving reparametrization that gives a model massive activation channels."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from latmix.models.adapter import LlamaFamilyAdapter, get_adapter
from latmix.settings import OUTLIER_POINTS

__all__ = ["OUTLIER_POINTS", "inject_channel_outliers"]

# Where outliers can be planted (OUTLIER_POINTS), each by an exact rescale of a (producer, consumer)
# pair of weights:
#   norm     RMSNorm weight channels up, the readers' (q/k/v, gate/up) columns down: residual-stream
#            outliers at the inputs of q/k/v and gate/up (undone by any preset that folds the norms)
#   mlp      up_proj rows up, the matching down_proj columns down: outliers at down_proj's input
#   attn_vo  v_proj rows (and bias) up, the o_proj columns of every query head reading that KV head
#            down: outliers at o_proj's input


@torch.no_grad()
def inject_channel_outliers(
    model: nn.Module, n_channels: int, scale: float, seed: int, *, points: Iterable[str] = ("norm",)
) -> torch.Tensor:
    """Scale chosen channels up by `scale` where they are produced and down by it where they are read.

    `points` (any of OUTLIER_POINTS, see there) says where. "norm" uses the same hidden channels in
    every block (like real massive activations); "mlp" and "attn_vo" choose `n_channels` channels per
    layer (of the intermediate size and of num_kv_heads * head_dim). All come from one generator
    seeded with `seed`, in a fixed order that does not depend on `points`: the hidden channels first
    (so the default is the original behaviour), then per layer the mlp and the attn_vo channels. Each
    rescale is exact up to rounding: SwiGLU's product and attention's output are linear in up_proj's
    and v_proj's outputs. Logits are unchanged; the quantized linears' inputs get outlier channels.
    Returns the hidden channels (those planted by "norm").
    """
    adapter = get_adapter(model)
    points = (points,) if isinstance(points, str) else tuple(points)
    _check_outlier_choices(adapter, points, n_channels, scale)
    generator = torch.Generator().manual_seed(seed)
    channels = torch.randperm(adapter.hidden_size, generator=generator)[:n_channels]
    for layer in adapter.layers():
        mlp_channels = torch.randperm(adapter.intermediate_size, generator=generator)[:n_channels]
        v_channels = torch.randperm(_value_size(adapter), generator=generator)[:n_channels]
        if "norm" in points:
            _plant_norm(adapter, layer, channels, scale)
        if "mlp" in points:
            _rescale(adapter.linear(layer, "up"), mlp_channels, adapter.mlp_writer(layer), mlp_channels, scale)
        if "attn_vo" in points:
            _plant_attn_vo(adapter, layer, v_channels, scale)
    return channels


def _value_size(adapter: LlamaFamilyAdapter) -> int:
    return adapter.num_kv_heads * adapter.head_dim


def _check_outlier_choices(adapter: LlamaFamilyAdapter, points: tuple[str, ...], n_channels: int, scale: float) -> None:
    unknown = [p for p in points if p not in OUTLIER_POINTS]
    if unknown or not points:
        raise ValueError(f"unknown outlier point(s) {unknown} in points={points}; choose from {OUTLIER_POINTS}")
    for point, size, what in (
        ("norm", adapter.hidden_size, "hidden_size"),
        ("mlp", adapter.intermediate_size, "intermediate_size"),
        ("attn_vo", _value_size(adapter), "num_kv_heads * head_dim"),
    ):
        if point in points and not 0 < n_channels <= size:
            raise ValueError(f"n_channels must be in [1, {what}={size}] for point {point!r}, got {n_channels}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")


def _plant_norm(adapter: LlamaFamilyAdapter, layer: nn.Module, channels: torch.Tensor, scale: float) -> None:
    """Both RMSNorm weights' `channels` up, their readers' columns down."""
    for norm, readers in (
        (adapter.input_norm(layer), adapter.attn_readers(layer)),
        (adapter.post_attention_norm(layer), adapter.mlp_readers(layer)),
    ):
        norm.weight[channels.to(norm.weight.device)] *= scale
        for linear in readers:
            linear.weight[:, channels.to(linear.weight.device)] /= scale


def _plant_attn_vo(adapter: LlamaFamilyAdapter, layer: nn.Module, v_channels: torch.Tensor, scale: float) -> None:
    """v_proj's `v_channels` up, and down every o_proj column that reads them."""
    # v channel (g, d) is read by query heads g * n_rep + r, whose o_proj input is column h * head_dim + d.
    n_rep = adapter.num_heads // adapter.num_kv_heads  # query heads per KV head (GQA)
    kv_head, dim = v_channels // adapter.head_dim, v_channels % adapter.head_dim
    heads = kv_head[:, None] * n_rep + torch.arange(n_rep)[None, :]
    o_columns = (heads * adapter.head_dim + dim[:, None]).flatten()
    _rescale(adapter.value_proj(layer), v_channels, adapter.attn_writer(layer), o_columns, scale)


def _rescale(producer: nn.Module, rows: torch.Tensor, consumer: nn.Module, columns: torch.Tensor, scale: float) -> None:
    """producer's output rows (and bias) *= scale, consumer's input columns /= scale."""
    producer.weight[rows.to(producer.weight.device)] *= scale
    if getattr(producer, "bias", None) is not None:
        producer.bias[rows.to(producer.bias.device)] *= scale
    consumer.weight[:, columns.to(consumer.weight.device)] /= scale
