"""Loading a causal LM, its config and its tokenizer from a local path or the Hugging Face hub."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from latmix.errors import ConfigError
from latmix.models.adapter import get_adapter

__all__ = ["load_config", "load_model"]


def load_config(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The model's transformers config alone (no weights); ConfigError saying what to do if it is unreachable."""
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as err:
        reason = str(err).strip().splitlines()[0]
        raise ConfigError(
            f"model.name_or_path={name_or_path!r} is not a local directory and could not be fetched from the "
            f"Hugging Face hub ({reason}). Download it first (huggingface-cli download {name_or_path} "
            "--local-dir DIR) and pass model.name_or_path=DIR"
        ) from err


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. float32, bfloat16 or float16")
    return resolved


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype,
    device: str | torch.device,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model in eval mode on `device`, tokenizer). Fails early if the architecture has no adapter."""
    torch_dtype = _as_dtype(dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        raise OSError(
            f"could not load model {name_or_path!r} ({error}). Without access to the Hugging Face hub, "
            "pass the path of a local directory holding the model's config, weights and tokenizer."
        ) from error
    get_adapter(model)
    return model.to(device).eval(), tokenizer
