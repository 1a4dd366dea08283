"""Loading a causal LM, its config and its tokenizer from a local path or the Hugging Face hub, checked first.

Everything a broken or unsupported checkpoint can do wrong is reported as a one-line ConfigError
naming the file or the key to change, before any heavy stage runs:

    load_config(name_or_path, trust_remote_code)   the model's directory first (latmix.modelfiles:
                                                   config.json readable, model_type with an adapter,
                                                   custom code only with model.trust_remote_code,
                                                   safetensors files whole), then transformers' config
    check_sequence_length(config, key, seq_len)    seq_len within the model's positions (modelfiles)
    load_model(...)                                the weights, then every tensor finite (named if not)
    weights_fingerprint(name_or_path)              what calibration checkpoints carry about the weights
    weights_fingerprint(..., with_mtime=False)     what a run record carries: the same, by content only

A hub id that is not cached and cannot be fetched names the `hf download` command.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from latmix.errors import ConfigError
from latmix.modelfiles import (
    check_architecture,
    check_model_directory,
    check_model_files,
    check_sequence_length,
    supported,
)

__all__ = [
    "check_finite_weights",
    "check_model_files",
    "check_sequence_length",
    "load_config",
    "load_model",
    "model_directory",
    "weights_fingerprint",
]

# Bytes hashed at each end of a weight file for its fingerprint (with its size, mtime and header).
FINGERPRINT_EDGE_BYTES = 1 << 20


def model_directory(name_or_path: str) -> Path | None:
    """The directory from_pretrained reads: a local directory, or a hub id's cached snapshot (None if neither)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or name_or_path.startswith((".", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name_or_path, "config.json")
    except Exception:  # not a valid repo id, no cache: nothing local to check
        return None
    return Path(found).parent if isinstance(found, str) else None


# --- the files -----------------------------------------------------------------------------------


def _hub_advice(name_or_path: str) -> str:
    return (f"Download it first (hf download {name_or_path} --local-dir DIR) and pass model.name_or_path=DIR")


def load_config(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The model's transformers config (no weights), after checking its local files; ConfigError if unusable."""
    directory = model_directory(name_or_path)
    if directory is not None:
        check_model_directory(directory, trust_remote_code)  # torch-free; config.py ran it on a local path
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as err:
        reason = str(err).strip().splitlines()[0]
        raise ConfigError(
            f"model.name_or_path={name_or_path!r} is not a local directory and could not be fetched from the "
            f"Hugging Face hub ({reason}). {_hub_advice(name_or_path)}"
        ) from err
    except ValueError as err:  # a hub config: custom code without trust, or an architecture transformers lacks
        text = " ".join(str(err).split())
        if "trust_remote_code" in text:
            check_architecture(None, True, False, f"model {name_or_path!r}")
        raise ConfigError(f"model {name_or_path!r}: {text[:300]}; latmix supports {supported()}") from err
    where = f"model {name_or_path!r}" if directory is None else f"the model config {directory / 'config.json'}"
    check_architecture(getattr(config, "model_type", None), False, trust_remote_code, where)
    return config


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. float32, bfloat16 or float16")
    return resolved


@torch.no_grad()
def check_finite_weights(model: nn.Module, source: str) -> None:
    """ConfigError naming the first parameter or buffer holding NaN or Inf (a damaged checkpoint)."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ConfigError(
                f"model weights: {name} holds {bad} non-finite value(s) (NaN/Inf) as loaded from {source}; "
                "the checkpoint is damaged: download or export it again"
            )


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype,
    device: str | torch.device,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model in eval mode on `device`, tokenizer). Fails early if the architecture has no adapter or a
    weight is not finite."""
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
    check_architecture(getattr(model.config, "model_type", None), False, trust_remote_code, f"model {name_or_path!r}")
    check_finite_weights(model, name_or_path)
    return model.to(device).eval(), tokenizer


# --- the fingerprint -----------------------------------------------------------------------------


def _weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    return files or sorted([*directory.glob("*.bin"), *directory.glob("*.pt"), *directory.glob("*.pth")])


def _manifest_hashes(directory: Path) -> dict[str, str]:
    """sha256 per file from a MANIFEST.json (latmix.models.cache and the shipped tiny model), if any."""
    try:
        files = json.loads((directory / "MANIFEST.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(files, dict):
        return {}
    out = {}
    for name, entry in files.items():
        digest = entry.get("sha256") if isinstance(entry, dict) else entry
        if isinstance(digest, str):
            out[name] = digest
    return out


def _file_fingerprint(path: Path, with_mtime: bool) -> str:
    """size, mtime (if asked), and sha256 of the first and last FINGERPRINT_EDGE_BYTES (the safetensors
    header included)."""
    real = path.resolve()  # a hub cache's blob is named by its sha256
    stat = real.stat()
    mtime = f":{stat.st_mtime_ns}" if with_mtime else ""
    digest = hashlib.sha256(f"{real.name}:{stat.st_size}{mtime}".encode())
    with open(real, "rb") as f:
        digest.update(f.read(FINGERPRINT_EDGE_BYTES))
        if stat.st_size > 2 * FINGERPRINT_EDGE_BYTES:
            f.seek(-FINGERPRINT_EDGE_BYTES, os.SEEK_END)
            digest.update(f.read())
    return digest.hexdigest()


def weights_fingerprint(name_or_path: str | None, *, with_mtime: bool = True) -> str:
    """A cheap fingerprint of a checkpoint's weights and config (16 hex chars).

    Per weight file: its manifest sha256 where a MANIFEST.json has one (the model cache verifies it on
    every load), size, mtime and a sha256 of its first and last MiB (which hold the safetensors
    header). Milliseconds for any size: a full sha256 runs at ~0.8 GB/s here (0.7 s for SmolLM2-135M's
    538 MB, ~20 s for an 8B model in bfloat16), paid by every run. A hub id that is not cached
    fingerprints as its name. with_mtime=False leaves the mtimes out: the same weights copied to
    another clone or machine fingerprint alike (what a run record compares, latmix.provenance).
    """
    if not name_or_path:
        return "unknown"
    directory = model_directory(str(name_or_path))
    if directory is None:
        return hashlib.sha256(f"hub:{name_or_path}".encode()).hexdigest()[:16]
    manifest = _manifest_hashes(directory)
    digest = hashlib.sha256()
    for path in [directory / "config.json", *_weight_files(directory)]:
        if path.is_file():
            digest.update(f"{path.name}:{manifest.get(path.name, '')}:{_file_fingerprint(path, with_mtime)}\n".encode())
    return digest.hexdigest()[:16]
