"""Calibration objectives: next-token KL, next-token cross-entropy, normalized block-output MSE, the bound
surrogate, the regularizer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latmix.bound import quantization_error_surrogate
from latmix.errors import ConfigError
from latmix.fidelity import next_token_kl
from latmix.formats import MXFormat
from latmix.transforms import Transform

__all__ = ["QuantizedOperand", "block_mse", "bound_loss", "next_token_ce", "next_token_kl", "volume_regularizer"]


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each next token of `ids` under `logits`: the language-modelling loss on the
    calibration text itself, which SpinQuant learns its rotations with (the KL learns toward the
    full-precision model's distribution instead)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def block_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||output - target||^2 / ||target||^2: the block's MSE relative to its output's energy.

    FlatQuant minimizes the plain MSE of one block at a time; dividing by the target's mean square makes
    blocks with large residual streams (late layers, massive activations) comparable, so a per-block
    loss can be read and summed across blocks.
    """
    diff = (output.float() - target.float()).pow(2).mean()
    return diff / target.float().pow(2).mean().clamp_min(torch.finfo(torch.float32).tiny)


@dataclass
class QuantizedOperand:
    """One activation quantization point: the operand y as quantized, and sigma_min of the composite map
    A behind it (differentiable; the points behind one map chain share the one tensor)."""

    name: str
    y: torch.Tensor
    sigma_min: torch.Tensor
    fmt: MXFormat
    block_size: int | None


def bound_loss(operands: Iterable[QuantizedOperand]) -> torch.Tensor:
    """Mean over quantization points of the bound surrogate divided by the RMS of the operand.

    Normalizing by the operand's own size (detached) keeps layers with large activations from
    dominating, as the relative block MSE does.
    """
    terms = []
    for op in operands:
        rms = op.y.detach().float().pow(2).sum(-1).mean().sqrt()
        terms.append(quantization_error_surrogate(op.y, op.fmt, op.block_size) / op.sigma_min / rms)
    if not terms:
        raise ConfigError("objective 'bound' needs quantized activations; set quant.act_format")
    return torch.stack(terms).mean()


def volume_regularizer(transforms: Iterable[Transform]) -> torch.Tensor:
    """sum over transforms of (log|det A|)^2: pulls every learned map toward volume preservation."""
    terms = [t.regularizer() for t in transforms]
    return torch.stack(terms).sum() if terms else torch.zeros(())
