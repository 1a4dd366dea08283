"""Decoder blocks as transformers runs them: the list, their inputs, their output, their names.

What a block receives (the hidden states and the keyword arguments the model computes once per
forward: position embeddings, masks), what it returns (a tensor in transformers 5, a tuple before),
where a module name says which block it belongs to ("model.layers.3.mlp.up_proj"), and how gradient
(activation) checkpointing is switched on (renamed in transformers 5): calibration and GPTQ work block
by block through these functions and know none of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from latmix.hooks import Hooks
from latmix.models.adapter import get_adapter

__all__ = [
    "block_index",
    "block_inputs",
    "block_output",
    "decoder_layers",
    "gradient_checkpointing",
    "input_device",
    "run_block",
]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return get_adapter(model).layers()


def input_device(model: nn.Module) -> torch.device:
    """Where the model takes its input ids: its first parameter's device (the embedding's, also when offloaded)."""
    return next(model.parameters()).device


def block_output(output: Any) -> torch.Tensor:
    """A decoder block's hidden states (transformers 5 returns a tensor, older versions a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def block_index(name: str) -> int | None:
    """The decoder block a name belongs to ("layers.3.attn_vo", "model.layers.3.mlp.up_proj"), if any."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


class _StopForward(Exception):
    """Raised by a hook to end a forward once the first block's inputs are captured."""


@torch.no_grad()
def _first_block_inputs(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """(hidden states entering block 0, the keyword arguments every block is called with) for ids."""
    captured: dict[str, Any] = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    # prepend: stop before an offloaded block 0 would be moved to the device for nothing.
    with Hooks() as hooks:
        hooks.pre(decoder_layers(model)[0], hook, with_kwargs=True, prepend=True)
        with contextlib.suppress(_StopForward):
            model(ids.to(input_device(model)), use_cache=False)
    return captured["hidden"], captured["kwargs"]


def block_inputs(model: nn.Module, calib_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Block-0 inputs of every calibration sequence, and the shared block kwargs (from one sequence)."""
    first, kwargs = _first_block_inputs(model, calib_ids[:1])
    rest = [_first_block_inputs(model, calib_ids[i : i + 1])[0] for i in range(1, calib_ids.shape[0])]
    return torch.cat([first, *rest]), kwargs


@torch.no_grad()
def run_block(block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any], batch_size: int) -> torch.Tensor:
    """The block's output hidden states for every row of inputs, batch_size rows at a time."""
    return torch.cat(
        [block_output(block(inputs[i : i + batch_size], **kwargs)) for i in range(0, inputs.shape[0], batch_size)]
    )


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """HF gradient checkpointing for the duration (it acts in train mode; Llama has no dropout to wake)."""
    if not (enabled and getattr(model, "supports_gradient_checkpointing", False)):
        yield
        return
    was_training = model.training
    # transformers 5 renamed gradient checkpointing to activation checkpointing; 4.x has only the old name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        disable = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable = model.gradient_checkpointing_disable
    model.train()
    try:
        yield
    finally:
        disable()
        model.train(was_training)
