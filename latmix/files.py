"""Atomic file writes (a reader sees the previous file or the new one, never half of one), their leftovers,
the results directory's write probe, and a file's sha256."""

from __future__ import annotations

import glob
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from latmix.errors import ConfigError

__all__ = ["atomic_write", "check_writable_dir", "remove_temp_files", "sha256_file", "temp_files"]


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call write(file) on a temp file beside `path`, flush it to disk, then os.replace it onto `path`.

    The temp file is unique (several processes may write the same path at once) and removed if
    anything fails; the directory is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def temp_files(path: str | Path) -> list[Path]:
    """The temp files atomic_write leaves beside `path` when its process is killed mid-write."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


def remove_temp_files(path: str | Path) -> list[Path]:
    """Remove what killed writers of `path` left (call it while holding the lock of whatever writes it)."""
    removed = temp_files(path)
    for tmp in removed:
        tmp.unlink(missing_ok=True)
    return removed


def check_writable_dir(path: str | Path, key: str) -> None:
    """ConfigError naming `key` unless `path` is (or can be made) a directory this process can write in.

    Probed by creating and removing a file, so a read-only filesystem is caught as well as modes.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={path} is a file, not a directory; set {key} to a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(
            f"{key}={path} is not writable ({err.strerror or err}); set {key} to a directory you can write to"
        ) from err


def sha256_file(path: str | Path) -> str:
    """The file's sha256 (hex), read in 4 MiB chunks so that large weight files need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def text_source(path: str | Path, raw: bytes | None = None) -> dict[str, str]:
    """How a record names a text it read: its path and the sha256 of its bytes (raw, when already read)."""
    digest = hashlib.sha256(raw).hexdigest() if raw is not None else sha256_file(path)
    return {"path": str(path), "sha256": digest}
