"""Diagnostic figures saved next to each run: activation histograms and the bound vs the measured error."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are files; no display on cluster nodes
import matplotlib.pyplot as plt
import torch


def activation_histograms(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], path: str | Path
) -> Path:
    """One row per layer: the quantized activation's values before and after the transform (log counts).

    The title of each panel gives max|x| / rms, the crest factor that MX block scales suffer from.
    """
    layers = [name for name in before if name in after]
    if not layers:
        raise ValueError("no layer has activations both before and after the transform")
    fig, axes = plt.subplots(len(layers), 2, figsize=(8, 1.8 * len(layers)), squeeze=False)
    for row, name in enumerate(layers):
        for col, (label, acts) in enumerate((("before", before[name]), ("after", after[name]))):
            values = acts.detach().float().flatten().cpu()
            crest = (values.abs().max() / values.pow(2).mean().sqrt().clamp_min(1e-12)).item()
            ax = axes[row][col]
            ax.hist(values.numpy(), bins=100, log=True, color="tab:blue" if col == 0 else "tab:orange")
            ax.set_title(f"{name} {label}: max/rms {crest:.1f}", fontsize=8)
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    return _save(fig, path)


def bound_vs_error(per_layer: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Per layer: the error bound and the measured quantization error, before and after calibration."""
    series = ("bound_before", "error_before", "bound_after", "error_after")
    rows = [row for row in per_layer if any(row.get(key) is not None for key in series)]
    if not rows:
        raise ValueError("the calibration report has no bound or error measurements per layer")
    labels = [str(row.get("layer", i)) for i, row in enumerate(rows)]
    fig, ax = plt.subplots(figsize=(max(5, 0.4 * len(rows)), 3.5))
    for key, style in zip(series, ("C0--", "C0-o", "C1--", "C1-o"), strict=True):
        values = [row.get(key) for row in rows]
        if any(v is not None for v in values):
            ax.plot(labels, [float("nan") if v is None else v for v in values], style, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("||error||")
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelrotation=90, labelsize=6)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
