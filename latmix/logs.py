"""Quiet logs: third-party output that asks nothing of the user is silenced where it starts.

A run's log should be latmix's own lines (run id, model, method, stage times, the summary, where the
record went). Each silence below names the library, the logger or warning, and why it is noise;
nothing here touches latmix's loggers or Python warnings in general.

`quiet_third_party()` (idempotent; run.py calls it before the pipeline is imported, experiment.run
again for library callers):

- torchao: transformers >= 5 imports torchao whenever it is installed (its quantizer registry probes
  `is_torchao_available()` when `transformers.modeling_utils` is first imported). latmix never loads a
  torchao-quantized checkpoint, and torchao is only a dev extra (the MX cross-check in the tests), so
  the probe is answered "no" before transformers' model code is imported: no torchao import, none of
  its `.so` load failures ("Failed to load .../_C_mxfp8...so"), no "Detected no triton", and no torch
  `_pytree` "Enum subclass ... register_constant() is deprecated" warnings (torchao registers those
  enums at import). Where torchao was imported anyway (earlier in the process), its loggers are set
  to ERROR and the pytree deprecation is filtered by its message.
- transformers: the tokenizer's "Token indices sequence length is longer than the specified maximum
  sequence length" is dropped (latmix encodes whole texts and cuts them into windows itself, and lm-eval
  truncates its own inputs); transformers' own progress bars ("Loading weights") are off (hub
  downloads keep theirs).
- lm-eval: INFO chatter (task selection, contexts, seeds) off; three warnings about the way latmix
  calls it ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model",
  "Overwriting default num_fewshot") dropped; other warnings stay.

`quiet_evaluation()` is a scope for the zero-shot evaluation: lm-eval's progress bars (contexts,
tokenizing, loglikelihood requests, bootstrap) are disabled and its "bootstrapping for stddev" print
is dropped. latmix's own bars (calibration, GPTQ) run outside that scope and stay.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterable, Iterator

__all__ = ["MessageFilter", "quiet_evaluation", "quiet_third_party"]

# (logger, messages it logs that are noise for a latmix run; each matched at the start of the message)
DROPPED_MESSAGES: dict[str, tuple[str, ...]] = {
    "transformers.tokenization_utils_base": ("Token indices sequence length is longer than the specified maximum",),
    "torch.utils._pytree": ("<enum ",),  # "<enum 'X'> is an Enum subclass and is now natively supported ..."
    "lm_eval.models.huggingface": (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
    ),
    "lm_eval.evaluator": ("Overwriting default num_fewshot",),
}
# Whole loggers held at a level: torchao (only if imported anyway) and lm-eval's INFO lines.
LOGGER_LEVELS: dict[str, int] = {"torchao": logging.ERROR, "lm_eval": logging.WARNING}
# Lines lm-eval prints (not logs) while it evaluates.
DROPPED_PRINTS = ("bootstrapping for stddev",)


class MessageFilter(logging.Filter):
    """Drops records whose message starts with one of `prefixes` (attached to one logger)."""

    def __init__(self, prefixes: Iterable[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def _install_filter(logger_name: str, prefixes: tuple[str, ...]) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, MessageFilter) and f.prefixes == prefixes for f in logger.filters):
        logger.addFilter(MessageFilter(prefixes))


def _skip_torchao_probe() -> None:
    """Answer transformers' torchao probe with "not available", before its model code imports torchao."""
    if "torchao" in sys.modules or "transformers.modeling_utils" in sys.modules:
        return  # too late (or already imported on purpose): the logger levels and filters cover it
    import transformers.utils
    from transformers.utils import import_utils

    def torchao_not_used(*_args: object, **_kwargs: object) -> bool:
        return False

    import_utils.is_torchao_available = torchao_not_used
    transformers.utils.is_torchao_available = torchao_not_used


def _no_transformers_bars() -> None:
    """transformers' own tqdm bars (model loading) off; huggingface_hub's download bars are not these."""
    from transformers.utils import logging as hf_logging

    def disabled(factory, args, kwargs):
        return factory(*args, **{**kwargs, "disable": True})

    hf_logging.set_tqdm_hook(disabled)


def quiet_third_party() -> None:
    """Silence the third-party noise listed in this module's docstring (safe to call more than once)."""
    _skip_torchao_probe()
    _no_transformers_bars()
    for name, level in LOGGER_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    for name, prefixes in DROPPED_MESSAGES.items():
        _install_filter(name, prefixes)


class _DropLines(io.TextIOBase):
    """A text stream that forwards everything to `target` except whole lines starting with `prefixes`."""

    def __init__(self, target, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.target = target
        self.prefixes = prefixes
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not line.startswith(self.prefixes):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and not self.pending.startswith(self.prefixes):
            self.target.write(self.pending)
        self.pending = ""
        self.target.flush()


@contextlib.contextmanager
def _tqdm_disabled() -> Iterator[None]:
    """Every tqdm bar created inside the block is disabled (lm-eval passes disable=False explicitly)."""
    from tqdm import std

    original = std.tqdm.__dict__["__init__"]

    def init(self, *args, **kwargs):
        kwargs["disable"] = True
        original.__get__(self, type(self))(*args, **kwargs)

    std.tqdm.__init__ = init
    try:
        yield
    finally:
        std.tqdm.__init__ = original


@contextlib.contextmanager
def quiet_evaluation() -> Iterator[None]:
    """The zero-shot evaluation without lm-eval's progress bars and prints (latmix's log lines stay)."""
    stream = _DropLines(sys.stdout, DROPPED_PRINTS)
    try:
        with _tqdm_disabled(), contextlib.redirect_stdout(stream):
            yield
    finally:
        stream.flush()
