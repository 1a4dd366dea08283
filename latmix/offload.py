"""Block offload: a model's decoder blocks stay in storage (CPU memory) and visit the compute device one
at a time, so a model larger than the GPU calibrates, GPTQs and evaluates with one block resident.

offload_blocks(model, device) puts everything outside the blocks (embeddings, final norm, lm_head,
rotary tables, a shared residual transform) on `device` and every block in storage. A block moves to
`device` when its forward starts and back when it ends, unless it is held there by `resident(model,
block)`: layer-wise calibration and GPTQ hold the block they work on for the whole of its many
forwards and backwards, and any whole-model forward (measurements, evaluation) streams the blocks.

A tensor is either inside exactly one block or outside every block: tensors reachable from outside
the blocks (a residual transform folded into every block's readers and into lm_head) never move.

A model's BlockOffload lives as long as the hooks it put on the model's blocks; this module keeps
only a weak index from the model to it (`offload_of`), so nothing rides on the model and nothing
outlives it: `resident(model, block)` looks the model up there, and a model not offloaded has none.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from latmix.models import decoder_layers

__all__ = ["BlockOffload", "offload_blocks", "offload_of", "resident"]

_OFFLOADS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[BlockOffload]] = weakref.WeakKeyDictionary()


class BlockOffload:
    """The hooks and bookkeeping of one model's offloaded blocks (see the module docstring)."""

    def __init__(self, model: nn.Module, device: torch.device | str, storage: torch.device | str = "cpu") -> None:
        self.model = model
        self.device = torch.device(device)
        self.storage = torch.device(storage)
        self.blocks = decoder_layers(model)
        self._held: set[int] = set()
        self._loaded: set[int] = set()
        for module in self._outside_modules():
            _move_own_tensors(module, self.device, keep=set())
        for block in self.blocks:
            self._move(block, self.storage)
            block.register_forward_pre_hook(self._arrive)
            block.register_forward_hook(self._leave, always_call=True)

    def on_device(self) -> list[int]:
        """Indices of the blocks now moved to the compute device (tracked even where storage is the device)."""
        return [i for i, block in enumerate(self.blocks) if id(block) in self._loaded]

    @contextlib.contextmanager
    def resident(self, block: nn.Module) -> Iterator[None]:
        """Keep `block` on the compute device for the duration, however many forwards run on it."""
        if id(block) in self._held:
            yield
            return
        self._load(block)
        self._held.add(id(block))
        try:
            yield
        finally:
            self._held.discard(id(block))
            self._unload(block)

    def _arrive(self, block: nn.Module, args) -> None:
        if id(block) not in self._held:
            self._load(block)

    def _leave(self, block: nn.Module, args, output) -> None:
        if id(block) not in self._held:
            self._unload(block)

    def _load(self, block: nn.Module) -> None:
        self._move(block, self.device)
        self._loaded.add(id(block))

    def _unload(self, block: nn.Module) -> None:
        self._move(block, self.storage)
        self._loaded.discard(id(block))

    def _move(self, block: nn.Module, device: torch.device) -> None:
        keep = {id(t) for m in self._outside_modules() for t in _own_tensors(m)}
        for module in block.modules():
            _move_own_tensors(module, device, keep)

    def _outside_modules(self) -> Iterator[nn.Module]:
        """Every module reachable from the model without entering a decoder block."""
        blocks = {id(b) for b in self.blocks}
        stack, seen = [self.model], set()
        while stack:
            module = stack.pop()
            if id(module) in blocks or id(module) in seen:
                continue
            seen.add(id(module))
            yield module
            stack.extend(child for child in module._modules.values() if child is not None)


def _own_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from (p for p in module._parameters.values() if p is not None)
    yield from (b for b in module._buffers.values() if b is not None)


def _move_own_tensors(module: nn.Module, device: torch.device, keep: set[int]) -> None:
    """Move the module's own parameters (in place: optimizers keep their references) and buffers."""
    for param in module._parameters.values():
        if param is None or id(param) in keep or param.device == device:
            continue
        param.data = param.data.to(device)
        if param.grad is not None:
            param.grad = param.grad.to(device)
    for name, buffer in module._buffers.items():
        if buffer is not None and id(buffer) not in keep and buffer.device != device:
            module._buffers[name] = buffer.to(device)


def offload_blocks(
    model: nn.Module, device: torch.device | str, storage: torch.device | str = "cpu"
) -> BlockOffload:
    """Install block offload on `model` (once); returns its BlockOffload (also `offload_of(model)`)."""
    if offload_of(model) is not None:
        raise ValueError("this model's blocks are already offloaded")
    offload = BlockOffload(model, device, storage)
    _OFFLOADS[model] = weakref.ref(offload)
    return offload


def offload_of(model: nn.Module) -> BlockOffload | None:
    """The model's BlockOffload, or None when its blocks are not offloaded."""
    ref = _OFFLOADS.get(model)
    return None if ref is None else ref()


def resident(model: nn.Module, block: nn.Module) -> contextlib.AbstractContextManager:
    """Hold `block` on the compute device if the model is offloaded; otherwise do nothing."""
    offload = offload_of(model)
    return offload.resident(block) if offload is not None else contextlib.nullcontext()
