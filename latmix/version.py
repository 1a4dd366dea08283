"""The version of the code a run computes with: a hash of the latmix package's sources.

Unlike the git commit it covers uncommitted edits and needs no git; unlike a version number it
changes with every edit. Calibration checkpoints carry it, so a checkpoint written by other code is
never resumed. Computed once per process (about 50 files, milliseconds): the code a process runs is
the code it imported.

LATMIX_CODE_VERSION, when set, is taken as the version instead: to resume a checkpoint across an
edit known not to change calibration (set it to the version the warning names), or to keep the
processes of one test on one version while the checkout is being edited.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

__all__ = ["code_version"]

PACKAGE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 over the relative paths and contents of every latmix/**/*.py, first 16 hex chars."""
    if os.environ.get("LATMIX_CODE_VERSION"):
        return os.environ["LATMIX_CODE_VERSION"]
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
