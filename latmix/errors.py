"""The error a user fixes by changing a setting (run.py prints it as one line); anything else is a bug."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what to set instead."""
