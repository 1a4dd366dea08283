"""A model directory's files checked without torch: config.json, architecture, custom code, safetensors, positions.

`check_model_directory(directory, trust_remote_code, seq_len)` is what `config.build_experiment` runs on
a local model.name_or_path, before run.py imports the pipeline, so a broken or unsupported checkpoint
costs half a second, not an import of torch; `latmix.models.loading.load_config` runs the same checks
on whatever directory it loads from (a hub id's cached snapshot too). Each problem is one
ConfigError line naming the file or the key to change:

- config.json missing, not JSON, not an object;
- a model_type latmix has no adapter for (settings.MODEL_TYPES; the line names the config and the
  supported ones), custom code (auto_map) without model.trust_remote_code=true;
- a safetensors file truncated, with a garbled header, inconsistent tensor sizes or trailing bytes,
  or a shard its index names missing;
- calib.seq_len past the model's max_position_embeddings.

Only reads headers (the first bytes of each weight file): milliseconds for any model size.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from latmix.errors import ConfigError
from latmix.settings import MODEL_TYPES

__all__ = [
    "SAFETENSORS_DTYPES",
    "check_architecture",
    "check_model_directory",
    "check_model_files",
    "check_sequence_length",
    "read_config_json",
    "safetensors_problem",
]

# safetensors dtype -> bytes per element (sub-byte formats are not size-checked)
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


def supported() -> str:
    return ", ".join(sorted(MODEL_TYPES))


def read_config_json(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"model.name_or_path={directory} has no config.json: point model.name_or_path at a directory "
            "saved by save_pretrained (config, weights, tokenizer)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"model config {path} is not readable JSON ({err}); restore or re-download it") from err
    if not isinstance(config, dict):
        raise ConfigError(f"model config {path} is not a JSON object; restore or re-download it")
    return config


def check_architecture(model_type: Any, custom_code: bool, trust_remote_code: bool, where: str) -> None:
    """One line if latmix cannot adapt this architecture, or it needs custom code that is not allowed."""
    if custom_code and not trust_remote_code:
        unsupported = "" if model_type in MODEL_TYPES else (
            f"; model_type {model_type!r} has no latmix adapter either (supported: {supported()})"
        )
        raise ConfigError(
            f"{where} asks to run the model's own code (auto_map), which latmix runs only with "
            f"model.trust_remote_code=true (set it only for code you trust){unsupported}"
        )
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{where} has model_type {model_type!r}, which latmix has no adapter for; supported: {supported()} "
            "(an adapter for another architecture goes in latmix/models/adapter.py)"
        )


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (truncated, garbled header, inconsistent offsets), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"is truncated ({size} bytes, not even a header)"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                return f"is truncated or garbled (its header claims {header_len} bytes, the file has {size})"
            header = json.loads(f.read(header_len))
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    except (UnicodeDecodeError, ValueError):
        return "has a garbled header (not JSON)"
    if not isinstance(header, dict):
        return "has a garbled header (not a JSON object)"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = 1
            for dim in shape:
                numel *= int(dim)
        except (KeyError, TypeError, ValueError):
            return f"has a garbled header (tensor {name!r})"
        width = SAFETENSORS_DTYPES.get(dtype)
        if width is not None and stop - start != numel * width:
            return f"has a garbled header (tensor {name!r}: {stop - start} bytes for {numel} x {dtype})"
        end = max(end, stop)
    data = size - 8 - header_len
    if end > data:
        return f"is truncated ({size} bytes; its header describes {8 + header_len + end})"
    if end < data:
        return f"has {data - end} bytes after its last tensor (garbled or partly overwritten)"
    return None


def check_model_files(directory: Path) -> None:
    """Every safetensors file of a model directory whole, and every file its index names present."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"model file {index} is not a readable index ({type(err).__name__}); restore or "
                              "re-download the checkpoint") from err
        missing = sorted(n for n in names if not (directory / n).is_file())
        if missing:
            raise ConfigError(f"model file {directory / missing[0]} is missing (named by {index.name}); the "
                              "checkpoint is incomplete: download or export it again")
    for path in sorted(directory.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise ConfigError(f"model file {path} {problem}: the checkpoint is damaged; download or export it again")


def check_sequence_length(config: Any, key: str, seq_len: int) -> None:
    """ConfigError naming `key` if seq_len exceeds the model's positions (a config object or config.json's dict)."""
    get = config.get if isinstance(config, dict) else lambda name: getattr(config, name, None)
    positions = get("max_position_embeddings") or get("n_positions")
    if isinstance(positions, int) and seq_len > positions:
        raise ConfigError(
            f"{key}={seq_len} is longer than the model's {positions} positions (max_position_embeddings); "
            f"set {key} to at most {positions}"
        )


def check_model_directory(directory: Path, trust_remote_code: bool, seq_len: int | None = None) -> dict[str, Any]:
    """All of the above for one model directory; returns its config.json."""
    config = read_config_json(directory)
    where = f"the model config {directory / 'config.json'}"
    check_architecture(config.get("model_type"), "auto_map" in config, trust_remote_code, where)
    check_model_files(directory)
    if seq_len is not None:
        check_sequence_length(config, "calib.seq_len", seq_len)
    return config
