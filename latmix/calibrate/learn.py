"""The LATMiX optimization: learn the transforms of a prepared model through the MX quantizer.

Two modes share the trainable parameters, objectives, optimizers and checkpoints:

- end_to_end (LATMiX): every learnable transform (T1 on the residual stream, T2 per block on v->o,
  pre-linear and down_proj maps) trained jointly on the quantized model's next-token KL to the
  full-precision model, gradients through the quantizer by the straight-through estimator;
- layer_wise (FlatQuant): one decoder block at a time, its input propagated through the already
  calibrated, quantized earlier blocks (or, with calib.layer_inputs=full_precision, as FlatQuant does,
  the full-precision model's own block input), its loss the normalized MSE to the full-precision block
  output. The global T1 stays at its initialization: this mode learns the per-block maps.

Either mode can instead minimize the bound surrogate (objective="bound"); end_to_end can instead learn on the
next-token cross-entropy of the calibration text (objective="ce", SpinQuant's loss). A volume regularizer
(sum log|s|)^2 = (log|det A|)^2 is added with weight reg_weight. Checkpoints (every checkpoint_every
steps end to end, after every block layer-wise) hold plain tensors only and are loaded with
weights_only=True; a second call with the same arguments resumes from them and ends with the same
transforms as an uninterrupted run. calibrate() ends by folding the transforms (freeze_model), so GPTQ
or evaluation can follow.

Models whose blocks are offloaded (latmix.offload, calib.offload) work unchanged: layer-wise holds the
block it calibrates on the device, and whole-model measurements stream the blocks.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from latmix import interrupt, quantize
from latmix.calibrate.checkpoint import (
    Checkpoints,
    load_params,
    param_state,
    rng_state,
    set_rng_state,
)
from latmix.calibrate.measure import (
    NonFiniteError,
    Point,
    block_outputs,
    captured_operands,
    finite_guard,
    per_layer_rows,
    quant_points,
    snapshot,
)
from latmix.calibrate.smooth import smooth_init
from latmix.calibrate.trainer import (
    Groups,
    Trainer,
    autocast,
    batch_indices,
    batches_per_epoch,
    clipping_summary,
    flat,
    install_clipping,
    matrices_built_once,
    micro_losses,
    total_steps,
    trainable,
)
from latmix.hooks import Hooks
from latmix.losses import block_mse, bound_loss, next_token_ce, next_token_kl, volume_regularizer
from latmix.models import blocks, get_adapter
from latmix.offload import resident
from latmix.quantize import PreparedModel, freeze_model, has_formats, quantizes
from latmix.settings import CalibConfig, OptimConfig
from latmix.transforms import Transform

__all__ = ["CalibrationReport", "StepCallback", "calibrate", "calibration_view"]

log = logging.getLogger(__name__)

# Sequences used to measure bound, error and losses before and after learning.
MEASURE_SEQUENCES = 4

StepCallback = Callable[[dict[str, Any]], None]


@dataclass
class CalibrationReport:
    """What calibration did, for the result record (DESIGN.md `calibration:`)."""

    mode: str
    objective: str
    seconds: float = 0.0
    steps: int = 0
    loss_before: float | None = None
    loss_after: float | None = None
    per_layer: list[dict[str, Any]] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    resumed_from_step: int | None = None
    skipped: str | None = None  # why nothing was calibrated (nothing to learn), or None
    smoothed: int | None = None  # maps given the calib.smooth_alpha start (None: smooth_alpha 0, off)
    measure_seconds: float | None = None  # the per-layer bound/error and KL measurement (None: not measured)
    clipping: dict[str, dict[str, float]] | None = None  # where learned clipping ratios ended (calib.learn_clipping)

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Calibration:
    """One calibration as a mode runs it: the models, the data, the settings, what is trained, and where
    its checkpoints go (with the state to resume from, if a checkpoint was there)."""

    prepared: PreparedModel
    fp_model: nn.Module
    calib_ids: torch.Tensor
    cfg: CalibConfig
    optim_cfg: OptimConfig
    groups: Groups
    points: list[Point]
    checkpoints: Checkpoints
    resume: dict[str, Any] | None
    on_step: StepCallback | None

    @property
    def model(self) -> nn.Module:
        return self.prepared.model


# --- end to end ----------------------------------------------------------------------------------


class _FPReference:
    """The full-precision model's logits on the calibration sequences, for the KL.

    The first time a sequence is seen the FP model runs whole, and its lm_head's input (the final
    hidden state) is kept; later epochs run only the lm_head on it, which is all the rest of that
    forward would add (the same logits, bit for bit). Kept where the FP model computes, in its dtype:
    n_samples x seq_len x hidden values (128 x 2048 x 4096 in bfloat16 is 2 GiB).
    """

    def __init__(self, fp_model: nn.Module, calib_ids: torch.Tensor) -> None:
        self.fp_model = fp_model
        self.calib_ids = calib_ids
        self.lm_head = get_adapter(fp_model).lm_head
        self.hidden: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def logits(self, indices: torch.Tensor) -> torch.Tensor:
        order = [int(i) for i in indices]
        missing = [i for i in order if i not in self.hidden]
        if missing:
            logits = self._forward(missing)
            if missing == order:
                return logits
        return self.lm_head(torch.stack([self.hidden[i] for i in order]))

    def _forward(self, indices: list[int]) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        with Hooks() as hooks:
            hooks.pre(self.lm_head, lambda module, args: captured.append(args[0]))
            ids = self.calib_ids[indices].to(blocks.input_device(self.fp_model))
            logits = self.fp_model(ids, use_cache=False).logits
        self.hidden.update(zip(indices, captured[0], strict=True))
        return logits


def _step(
    trainer: Trainer,
    step: int,
    model: nn.Module,
    indices: torch.Tensor,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    around: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> float:
    """One optimizer step on the sequences `indices`. Activations are not checked on every step (a pass
    over every quantized linear's input and output costs about 5% of a layer-wise step on SmolLM2): after a
    non-finite loss the step's forward runs again, checked, so that the error names the first quantized
    linear whose input or output holds a NaN/Inf (or, where none does, the loss's own error stands)."""
    # closing: a loss the trainer refuses leaves the generator suspended inside around(); close it now.
    try:
        with contextlib.closing(micro_losses(trainer.cfg, indices, loss_of, around)) as losses:
            return trainer.step(step, losses)
    except NonFiniteError:
        with finite_guard(model, trainer.params), torch.no_grad():
            for _ in micro_losses(trainer.cfg, indices, loss_of):
                pass
        raise


def _end_to_end_loss(
    run: _Calibration, reference: _FPReference, indices: torch.Tensor, transforms: list[Transform]
) -> torch.Tensor:
    model, cfg = run.model, run.cfg
    device = blocks.input_device(model)
    ids = run.calib_ids[indices].to(device)
    if cfg.objective == "bound":
        with captured_operands(run.points) as operands, autocast(cfg, device):
            model(ids, use_cache=False)
        loss = bound_loss(operands)
    else:
        with autocast(cfg, device):
            logits = model(ids, use_cache=False).logits
        if cfg.objective == "ce":
            loss = next_token_ce(logits, ids)
        else:
            loss = next_token_kl(logits, reference.logits(indices).to(device))
    return loss + cfg.reg_weight * volume_regularizer(transforms).to(loss.device)


def _run_end_to_end(run: _Calibration) -> tuple[int, list[str]]:
    model, cfg, calib_ids = run.model, run.cfg, run.calib_ids
    transforms = run.prepared.transforms
    learned = [transforms[o] for o in run.groups if o in transforms]
    total = total_steps(cfg, calib_ids.shape[0])
    trainer = Trainer(run.groups, cfg, run.optim_cfg, total, "end-to-end calibration")
    start = 0
    if run.resume is not None:
        trainer.load(run.resume["trainer"])
        set_rng_state(run.resume["rng"])
        start = run.resume["step"]
    progress = tqdm(range(start, total), desc="calibrate end_to_end", initial=start, total=total, leave=False)
    reference = _FPReference(run.fp_model, calib_ids)

    def loss_of(chunk: torch.Tensor) -> torch.Tensor:
        return _end_to_end_loss(run, reference, chunk, learned)

    with blocks.gradient_checkpointing(model, cfg.grad_checkpointing):
        for step in progress:
            indices = batch_indices(cfg, calib_ids.shape[0], step)
            loss = _step(trainer, step, model, indices, loss_of, around=lambda: matrices_built_once(learned))
            progress.set_postfix(loss=f"{loss:.4g}", epoch=step // batches_per_epoch(cfg, calib_ids.shape[0]))
            done = step + 1
            due = done % cfg.checkpoint_every == 0 or done == total
            if due:
                trainer.guard_conditioning(transforms)
            # Saves when due, every calib.checkpoint_minutes, and before stopping on a signal (latmix.interrupt).
            run.checkpoints.after_step(
                done, total, due, lambda done=done: {"step": done, "trainer": trainer.state(), "rng": rng_state()}
            )
            if run.on_step is not None:
                run.on_step({"mode": "end_to_end", "step": done, "loss": loss})
    return total, trainer.rolled_back


# --- layer-wise ----------------------------------------------------------------------------------


def _layer_wise_loss(
    block: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    kwargs: dict,
    cfg: CalibConfig,
    points: list[Point],
    transforms: list[Transform],
) -> torch.Tensor:
    if cfg.objective == "bound":
        with captured_operands(points) as operands, autocast(cfg, x.device):
            block(x, **kwargs)
        loss = bound_loss(operands)
    else:
        with autocast(cfg, x.device):
            loss = block_mse(blocks.block_output(block(x, **kwargs)), target)
    return loss + cfg.reg_weight * volume_regularizer(transforms).to(loss.device)


def _train_block(
    trainer: Trainer,
    model: nn.Module,
    block: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor, dict[str, Any]],
    points: list[Point],
    transforms: dict[str, Transform],
    index: int,
) -> None:
    """All optimizer steps of one block of `model`: its inputs x_q against its full-precision targets."""
    x_q, target, kwargs = data
    cfg = trainer.cfg
    learned = [transforms[o] for o in trainer.groups if o in transforms]
    progress = tqdm(range(trainer.total_steps), desc=f"block {index}", leave=False)

    def loss_of(chunk: torch.Tensor) -> torch.Tensor:
        return _layer_wise_loss(block, x_q[chunk], target[chunk], kwargs, cfg, points, learned)

    for step in progress:
        idx = batch_indices(cfg, x_q.shape[0], step)
        loss = _step(trainer, step, model, idx, loss_of)
        progress.set_postfix(loss=f"{loss:.4g}")
        interrupt.check(f"block {index}, step {step + 1} (the block is redone on resume)")


def _run_layer_wise(run: _Calibration) -> tuple[int, list[str], dict[int, float]]:
    """Block by block: block i of the quantized model, fed the quantized stream (or, with
    calib.layer_inputs=full_precision, the full-precision stream), learns to reproduce the full-precision
    block i on the full-precision stream (mapped by the fixed T1 into the model's basis). The targets
    come from fp_model, so they do not depend on any parameter being learned."""
    model, fp_model, cfg, groups = run.model, run.fp_model, run.cfg, run.groups
    transforms = run.prepared.transforms
    residual = transforms.get("residual")
    if residual is not None:
        residual.requires_grad_(False)
    layers, fp_layers = blocks.decoder_layers(model), blocks.decoder_layers(fp_model)
    x_q, kwargs = blocks.block_inputs(model, run.calib_ids)
    x_fp, fp_kwargs = blocks.block_inputs(fp_model, run.calib_ids)
    first, steps_done, rolled_back, seconds = 0, 0, [], {}
    if run.resume is not None:
        first, steps_done = run.resume["block"], run.resume["steps_done"]
        rolled_back, seconds = list(run.resume["rolled_back"]), dict(run.resume["seconds"])
        load_params(flat(groups), run.resume["params"])
        set_rng_state(run.resume["rng"])
    total = total_steps(cfg, run.calib_ids.shape[0])
    fp_inputs = cfg.layer_inputs == "full_precision"
    for i in tqdm(range(len(layers)), desc="calibrate layer_wise", leave=False):
        block = layers[i]
        with resident(fp_model, fp_layers[i]):
            x_fp = blocks.run_block(fp_layers[i], x_fp, fp_kwargs, cfg.batch_size)
        with torch.no_grad():
            target = x_fp if residual is None else residual(x_fp)
        block_groups = {o: ps for o, ps in groups.items() if blocks.block_index(o) == i and o not in rolled_back}
        with run.prepared.resident(block):
            if i >= first and block_groups:
                started = time.perf_counter()
                trainer = Trainer(block_groups, cfg, run.optim_cfg, total, f"layer-wise calibration of block {i}")
                block_points = [p for p in run.points if p[1] == i]
                _train_block(trainer, model, block, (x_q, target, kwargs), block_points, transforms, i)
                trainer.guard_conditioning(transforms)
                rolled_back += trainer.rolled_back
                steps_done += total
                seconds[i] = time.perf_counter() - started
            # The next block's input: this block's full-precision target, or its own quantized output.
            x_q = target if fp_inputs else blocks.run_block(block, x_q, kwargs, cfg.batch_size)
        if i >= first and run.checkpoints.enabled:
            run.checkpoints.save(
                {
                    "block": i + 1,
                    "steps_done": steps_done,
                    "rolled_back": rolled_back,
                    "seconds": seconds,
                    "params": param_state(flat(groups)),
                    "rng": rng_state(),
                }
            )
        if i >= first and run.on_step is not None:
            run.on_step({"mode": "layer_wise", "block": i, "step": steps_done})
        interrupt.check(f"the end of block {i} of {len(layers)}")  # a signal: stop here (checkpointed)
    return steps_done, rolled_back, seconds


# --- the one call --------------------------------------------------------------------------------


def calibrate(
    prepared: PreparedModel,
    fp_model: nn.Module,
    calib_ids: torch.Tensor,
    calib_cfg: CalibConfig,
    optim_cfg: OptimConfig,
    ckpt_dir: Path | str | None,
    *,
    heldout_ids: torch.Tensor | None = None,
    on_step: StepCallback | None = None,
) -> CalibrationReport:
    """Learn the transforms of a prepared model against `fp_model`; fold them; report what changed.

    calib_ids (N, L) are the calibration sequences; heldout_ids (optional) are only measured on.
    ckpt_dir holds the latest checkpoint: a call with the same arguments resumes from it. on_step is
    called after every optimizer step (end to end) or block (layer-wise) with a progress dict; an
    exception it raises stops calibration there, as a preemption would. With nothing to learn (mode
    none, nothing quantized, no learnable parameter) nothing is calibrated: the report says why
    (`skipped`), and the model is measured once (before = after) when something is quantized.
    calib.smooth_alpha > 0 first gives the learnable affine maps their SmoothQuant start (smooth.py),
    whatever the mode.
    """
    started = time.perf_counter()
    if calib_ids.dim() != 2:
        raise ValueError(f"calib_ids must be (n_sequences, seq_len), got shape {tuple(calib_ids.shape)}")
    model = prepared.model
    fp_model.eval().requires_grad_(False)
    report = CalibrationReport(mode=calib_cfg.mode, objective=calib_cfg.objective)
    points = quant_points(model)
    if calib_cfg.smooth_alpha > 0:
        # The data-driven start of the affine maps: before anything is measured or learned (mode none too).
        report.smoothed = len(smooth_init(prepared, calib_ids, calib_cfg.smooth_alpha, calib_cfg.batch_size))
    groups, report.skipped = _what_to_learn(prepared, points, calib_cfg)
    if report.skipped is not None:
        log.info("calibration skipped: %s", report.skipped)

    rtn = calib_cfg.quantize_weights and report.skipped is None
    measured = calib_cfg.measure and quantizes(model, with_rtn_weights=rtn)
    measure_ids = calib_ids[:MEASURE_SEQUENCES]
    heldout = None if heldout_ids is None else heldout_ids[:MEASURE_SEQUENCES]
    seconds: dict[int, float] = {}
    residual = prepared.residual
    with calibration_view(model, rtn_weights=rtn, online_maps=calib_cfg.online_maps):
        if measured:
            with _measuring(report):
                reference = block_outputs(fp_model, measure_ids)
                before = snapshot(model, reference, residual, measure_ids, heldout, flat(groups))
        if groups:
            with _learning_rounding(model, calib_cfg):
                seconds = _learn(
                    report, prepared, fp_model, calib_ids, calib_cfg, optim_cfg, groups, points, ckpt_dir, on_step
                )
        if measured:
            with _measuring(report):
                # With nothing learned the model has not changed: the one measurement is both before and after.
                after = snapshot(model, reference, residual, measure_ids, heldout, flat(groups)) if groups else before
                report.loss_before, report.loss_after = before.kl, after.kl
                report.per_layer = per_layer_rows(points, before, after, seconds)
            log.info("measured the bound and error at %d points in %.1f s (%s)", len(report.per_layer),
                     report.measure_seconds, "before and after learning" if groups else "once: nothing learned")
    if calib_cfg.learn_clipping and groups:
        report.clipping = clipping_summary(points)
    for params in groups.values():
        for p in params.values():
            p.requires_grad_(False)
    freeze_model(prepared)
    report.seconds = time.perf_counter() - started
    return report


def _learning_rounding(model: nn.Module, cfg: CalibConfig) -> contextlib.AbstractContextManager:
    """How the quantizers round while learning (calib.rounding); the measurements around it round to nearest."""
    return quantize.rounding_noise(model) if cfg.rounding == "noise" else contextlib.nullcontext()


@contextlib.contextmanager
def _measuring(report: CalibrationReport) -> Iterator[None]:
    """Adds the seconds spent inside to report.measure_seconds (the share of a run that measurement costs)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        report.measure_seconds = (report.measure_seconds or 0.0) + time.perf_counter() - start


def _what_to_learn(prepared: PreparedModel, points: list[Point], cfg: CalibConfig) -> tuple[Groups, str | None]:
    """(the trainable parameters, None), or ({}, why there is nothing to learn); installs learned clipping."""
    model = prepared.model
    if cfg.mode == "none":
        return {}, "calib.mode=none"
    if not has_formats(model):
        return {}, "nothing is quantized (quant has no weight, activation or KV-cache format)"
    if not quantizes(model, with_rtn_weights=cfg.quantize_weights):
        return {}, (
            "nothing is quantized while calibrating: the weights wait for GPTQ and the activations stay in "
            "high precision (calib.quantize_weights=true learns against round-to-nearest weights)"
        )
    if cfg.learn_clipping:
        install_clipping(points, rtn_weights=cfg.quantize_weights)
    groups = trainable(prepared, points, cfg.learn_clipping)
    return groups, None if groups else "no learnable parameter (every transform is fixed)"


def _learn(
    report: CalibrationReport,
    prepared: PreparedModel,
    fp_model: nn.Module,
    calib_ids: torch.Tensor,
    cfg: CalibConfig,
    optim_cfg: OptimConfig,
    groups: Groups,
    points: list[Point],
    ckpt_dir: Path | str | None,
    on_step: StepCallback | None,
) -> dict[int, float]:
    """Run the configured mode from its checkpoint, if any; fills the report; returns seconds per block."""
    checkpoints = Checkpoints.for_calibration(ckpt_dir, cfg, optim_cfg, calib_ids, list(flat(groups)), prepared.model)
    resume = checkpoints.load()
    if resume is not None:
        report.resumed_from_step = resume.get("step", resume.get("steps_done"))
    run = _Calibration(prepared, fp_model, calib_ids, cfg, optim_cfg, groups, points, checkpoints, resume, on_step)
    if cfg.mode == "end_to_end":
        report.steps, report.rolled_back = _run_end_to_end(run)
        return {}
    report.steps, report.rolled_back, seconds = _run_layer_wise(run)
    return seconds


@contextlib.contextmanager
def calibration_view(model: nn.Module, *, rtn_weights: bool, online_maps: bool) -> Iterator[None]:
    """The model as calibration runs it: round-to-nearest weights (calib.quantize_weights) and cheap maps
    on the activations while the weights are unquantized (calib.online_maps), as configured."""
    with contextlib.ExitStack() as stack:
        if rtn_weights:
            stack.enter_context(quantize.rtn_weights(model))
        if online_maps:
            stack.enter_context(quantize.maps_on_activations(model))
        yield
