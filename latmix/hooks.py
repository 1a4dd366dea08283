"""Forward hooks that live for one `with` block: registered through it, every one removed at its end.

    with Hooks() as hooks:
        for name, module in points:
            hooks.pre(module, capture(name))
        model(ids)

The removal runs whatever happens inside the block (an exception, a hook that stops the forward).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["Hooks"]


class Hooks:
    """A set of forward (pre-)hooks removed together when the `with` block ends."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def pre(self, module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> None:
        """module.register_forward_pre_hook(hook, **kwargs), until the block ends."""
        self._handles.append(module.register_forward_pre_hook(hook, **kwargs))

    def post(self, module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> None:
        """module.register_forward_hook(hook, **kwargs), until the block ends."""
        self._handles.append(module.register_forward_hook(hook, **kwargs))

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
