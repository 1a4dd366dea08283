"""Seconds of work on a device, for the benchmarks in scripts/.

CUDA runs asynchronously: the queue is drained before and after the work, so that the time measured is
the work's and not that of launching it. On the CPU the two synchronizations do nothing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["median_seconds", "paired_medians", "synchronize", "timed"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of run()."""
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    return time.perf_counter() - start, result


def median_seconds(run: Callable[[], Any], repeats: int, device: torch.device) -> float:
    return statistics.median(timed(run, device)[0] for _ in range(max(repeats, 1)))


def paired_medians(
    run: Callable[[], Any], baseline: Callable[[], Any], repeats: int, device: torch.device
) -> tuple[float, float]:
    """Median seconds of run and of baseline, timed alternately so that both see the same machine load."""
    pairs = [(timed(run, device)[0], timed(baseline, device)[0]) for _ in range(max(repeats, 1))]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
