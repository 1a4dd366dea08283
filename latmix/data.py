"""Calibration and held-out token data: WikiText-2, C4 (through `datasets`) or a local text file.

Sequences are windows of `seq_len` tokens drawn at seeded random offsets from one token stream, as
QuaRot, FlatQuant and SpinQuant draw their 128 x 2048 WikiText-2 calibration set. The sha256 of the
ids actually used goes into the result record, so two runs can be checked to have seen the same data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from latmix.errors import ConfigError
from latmix.settings import SOURCES, check_choice

SPLITS = ("train", "validation", "test")

# The embedded default: plain text shipped with the project (data/MANIFEST.json), so calibration runs
# offline; its held-out file comes from other works than its calibration file.
_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "text"
LOCAL_TEXTS = {
    "train": _DATA_DIR / "calibration.txt",
    "validation": _DATA_DIR / "heldout.txt",
    "test": _DATA_DIR / "heldout.txt",
}
# C4 is too large to tokenize whole; one shard, as GPTQ and its successors use.
C4_SHARDS = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


def token_digest(ids: torch.Tensor) -> str:
    """sha256 of the token ids (as little-endian int64), independent of device and tensor layout."""
    data = ids.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy().astype("<i8").tobytes()
    return hashlib.sha256(data).hexdigest()


def _load_hub_texts(source: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise ConfigError(
            f"source={source!r} needs the `datasets` package; install it or use calib.source=local"
        ) from err
    try:
        if source == "wikitext2":
            rows = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
            # WikiText-2 is evaluated as one stream of its lines joined by blank lines (GPTQ, QuaRot).
            return ["\n\n".join(rows["text"])]
        if split not in C4_SHARDS:
            raise ValueError(f"c4 has no {split!r} split here; use 'train' or 'validation'")
        rows = datasets.load_dataset("allenai/c4", data_files={split: C4_SHARDS[split]}, split=split)
        return list(rows["text"])
    except (ConnectionError, OSError, FileNotFoundError) as err:
        raise ConfigError(
            f"could not load {source!r} through `datasets` ({' '.join(str(err).split())[:200]}); without network or a local HF cache, "
            "calibrate on a text file: calib.source=local calib.path=FILE"
        ) from err


def local_text_file(split: str, path: Path | str | None) -> Path:
    """The file source='local' reads for a split: `path` if given, else the embedded text."""
    return Path(path) if path is not None else LOCAL_TEXTS[split]


def _read_local_text(split: str, path: Path | str | None) -> str:
    path = local_text_file(split, path)
    if not path.is_file():
        raise ConfigError(f"calib.path={path} does not exist; set calib.path to an existing text file")
    return path.read_text(encoding="utf-8")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_stream(
    tokenizer: Any,
    source: str,
    split: str = "train",
    path: Path | str | None = None,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """All tokens of a source split as one 1-D LongTensor (C4: documents joined, up to max_tokens).

    source='local' reads `path` if given (whatever the split), else the embedded file of the split.
    """
    check_choice("source", source, SOURCES)
    check_choice("split", split, SPLITS)
    if source == "local":
        return torch.tensor(_encode(tokenizer, _read_local_text(split, path)), dtype=torch.long)
    ids: list[int] = []
    for text in _load_hub_texts(source, split):
        ids.extend(_encode(tokenizer, text))
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(stream: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """n_samples windows of seq_len tokens at offsets drawn from a generator seeded with `seed`."""
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"need n_samples >= 1 and seq_len >= 1, got {n_samples} and {seq_len}")
    if stream.numel() < seq_len + 1:
        raise ConfigError(
            f"the text has {stream.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "lower seq_len or use a longer text"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len, (n_samples,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def calibration_batches(
    tokenizer: Any,
    source: str,
    n_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    *,
    split: str = "train",
    path: Path | str | None = None,
) -> tuple[torch.Tensor, str]:
    """(ids (n_samples, seq_len), sha256 of those ids): seeded windows from one source split."""
    # C4 documents are short; a margin of 4x the tokens needed leaves room for distinct windows.
    stream = token_stream(tokenizer, source, split, path, max_tokens=4 * n_samples * seq_len)
    ids = sample_windows(stream, n_samples, seq_len, seed)
    return ids, token_digest(ids)
