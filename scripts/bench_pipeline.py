"""The pipeline's cost on a real model, stage by stage, against the matching full-precision work.

Runs one experiment's stages as `run.py` does (same config groups; pinned: SmolLM2-135M, MXFP4 W4A4,
transform=affine_literal, whose affine maps are learned end to end on the KL, so that there is a
calibration step to time (the default transform=affine learns nothing); else the defaults: GPTQ,
calib=default, eval=local) and times each next to the full-precision work it should be compared with,
on the same data (goals from issue #12):

    calib step    one end-to-end optimizer step      vs  FP forward + backward of the same batch (<= 2x)
    fold maps     freeze_model, the learned maps folded into the weights at the end of calibrate
    measurement   the per-layer bound/error and KL   vs  the run: the sum of the stages timed (<= 10%)
    GPTQ          every block                        vs  one FP forward over the calibration set (< 60 s)
    quantized ppl perplexity of the quantized model  vs  the FP model on the same tokens (<= 1.5x)
    transform     prepare_model + the FP deviation   vs  one FP forward of the probe sequences, per preset

Every FP reference is timed next to the work it matches, so that both see the same machine load: each
calibration step is followed by an FP forward + backward of that step's batch (outside the step's
clock), and the quantized and FP perplexities alternate. Reported times are medians; one FP forward
of each model copy warms up before anything is timed.

    .venv/bin/python scripts/bench_pipeline.py                       # SmolLM2, the run.py defaults
    .venv/bin/python scripts/bench_pipeline.py --presets identity affine transform=affine_block
    .venv/bin/python scripts/bench_pipeline.py --profile eval        # torch profiler of one stage

Trailing arguments are Hydra overrides, as for run.py. The header says how many torch threads ran and
the load average before and after: on a shared machine compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from tabulate import tabulate

from latmix import evaluate
from latmix.calibrate import calibrate, learn
from latmix.calibrate.trainer import batch_indices
from latmix.config import compose_experiment
from latmix.experiment import (
    PROBE_SEQUENCES,
    RunTokens,
    load_model_checked,
    model_source,
    resolve_device,
    run_tokens,
)
from latmix.fidelity import Reference
from latmix.gptq import gptq_quantize_model
from latmix.quantize import PreparedModel, prepare_model, set_quantization
from latmix.settings import Experiment
from latmix.timing import median_seconds, paired_medians, timed

DEFAULT_OVERRIDES = ("model=smollm2-135m", "quant=mxfp4", "transform=affine_literal", "logger=none")
PRESETS = ("identity", "hadamard", "block_hadamard", "rotation", "affine", "affine_literal", "flatquant")
# stage -> (goal, how it is read): a ratio to the FP work, absolute seconds, or a fraction of calibrate.
GOALS = {
    "calib step": (2.0, "ratio"),
    "calib step, later epochs": (2.0, "ratio"),
    "quantized ppl": (1.5, "ratio"),
    "GPTQ": (60.0, "seconds"),
    "measurement": (0.10, "ratio"),
}


def experiment(overrides: Sequence[str]) -> Experiment:
    return compose_experiment([*DEFAULT_OVERRIDES, *overrides])


def profiled(stage: str, wanted: str | None):
    """A torch profiler around `stage` when it is the one asked for; prints its top ops when done."""
    if stage != wanted:
        return nullcontext()
    from torch.profiler import ProfilerActivity, profile

    class Printing(profile):
        def __exit__(self, *exc):
            result = super().__exit__(*exc)
            print(self.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
            return result

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return Printing(activities=activities)


class FullPrecision:
    """The matching full-precision work, on its own copy of the untouched model."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, batch_size: int) -> None:
        for start in range(0, ids.shape[0], batch_size):
            self.model(ids[start : start + batch_size].to(self.device), use_cache=False)

    def forward_backward(self, ids: torch.Tensor) -> float:
        """Seconds of a training step's forward and backward (weight gradients), without the optimizer."""
        self.model.requires_grad_(True)
        try:
            self.model.zero_grad(set_to_none=True)

            def run() -> None:
                logits = self.model(ids.to(self.device), use_cache=False).logits
                logits.float().logsumexp(-1).mean().backward()

            return timed(run, self.device)[0]
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.requires_grad_(False)


class StepClock:
    """Times calibrate's learning (learn._learn), its final fold (learn.freeze_model) and each optimizer
    step; after every step, outside the clocks, times the FP forward + backward of that step's batch (`pair`)."""

    def __init__(self, pair: Callable[[int], float] | None = None) -> None:
        self.pair = pair
        self.learning = 0.0
        self.fold = 0.0  # freeze_model: the learned maps folded into the weights
        self.excluded = 0.0  # seconds spent on the FP references inside calibrate
        self.steps: list[float] = []
        self.fp: list[float] = []
        self._learn = learn._learn
        self._freeze = learn.freeze_model
        self._mark = 0.0

    def __enter__(self) -> StepClock:
        def timed_learn(*args, **kwargs):
            start = self._mark = time.perf_counter()
            excluded = self.excluded
            try:
                return self._learn(*args, **kwargs)
            finally:
                self.learning += time.perf_counter() - start - (self.excluded - excluded)

        def timed_freeze(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._freeze(*args, **kwargs)
            finally:
                self.fold += time.perf_counter() - start

        learn._learn, learn.freeze_model = timed_learn, timed_freeze
        return self

    def __exit__(self, *exc) -> None:
        learn._learn, learn.freeze_model = self._learn, self._freeze

    def on_step(self, progress: dict) -> None:
        end = time.perf_counter()
        self.steps.append(end - self._mark)
        if self.pair is not None and progress.get("mode") == "end_to_end":
            self.fp.append(self.pair(progress["step"] - 1))
        self._mark = time.perf_counter()
        self.excluded += self._mark - end


@dataclass
class Report:
    header: str
    rows: list[list[Any]] = field(default_factory=list)
    presets: list[list[Any]] = field(default_factory=list)

    def row(self, stage: str, seconds: float, reference: str, fp_seconds: float | None, note: str = "") -> None:
        """One stage: its seconds, the matching FP work and its seconds, their ratio, the goal's verdict."""
        ratio = None if not fp_seconds else seconds / fp_seconds
        self.rows.append([stage, seconds, reference, fp_seconds, ratio, _verdict(stage, seconds, ratio, note)])

    def render(self) -> str:
        parts = [self.header, tabulate(
            self.rows, headers=["stage", "seconds", "matching FP work", "FP seconds", "ratio", "goal / note"],
            tablefmt="github", floatfmt=".3g", missingval="",
        )]
        if self.presets:
            parts += ["", tabulate(
                self.presets, headers=["transform preset", "place maps s", "FP-deviation forward s",
                                       "stage s", "FP forward s", "stage / FP forward"],
                tablefmt="github", floatfmt=".3g", missingval="",
            )]
        return "\n".join(parts)


def _verdict(stage: str, seconds: float, ratio: float | None, note: str) -> str:
    if stage not in GOALS:
        return note
    goal, kind = GOALS[stage]
    value = seconds if kind == "seconds" else ratio
    if value is None:
        return note
    wanted = f"< {goal:g} s" if kind == "seconds" else (f"<= {goal:.0%}" if goal < 1 else f"<= {goal:g}x")
    met = value < goal if kind == "seconds" else value <= goal
    return "; ".join(filter(None, [f"{wanted}: {'met' if met else 'NOT met'}", note]))


def transform_presets(
    model: torch.nn.Module, exp: Experiment, presets: Sequence[str], overrides: Sequence[str],
    probe_ids: torch.Tensor, device: torch.device,
) -> list[list[Any]]:
    """The transform stage of each preset, on a fresh copy of the model: placing the maps
    (prepare_model), the reference FP forward on the probe sequences, and the FP deviation forward."""
    rows = []
    for preset in presets:
        preset_exp = experiment([*overrides, f"transform={preset}"])
        t_reference, reference = timed(partial(Reference.of, model, probe_ids), device)
        t_place, prepared = timed(partial(prepare_model, copy.deepcopy(model), preset_exp.transform, exp.quant), device)
        prepared.reference = reference
        t_deviation = timed(prepared.fp_deviation, device)[0]
        stage = t_place + t_reference + t_deviation
        rows.append([preset, t_place, t_deviation, stage, t_reference, stage / t_reference])
    return rows


@dataclass
class _Bench:
    """One experiment's stages, each timed next to its FP work and added to `report` as it runs."""

    exp: Experiment
    device: torch.device
    model: torch.nn.Module
    tokens: RunTokens
    fp: FullPrecision
    report: Report
    repeats: int
    profile: str | None

    def transform(self) -> PreparedModel:
        probe_ids = self.tokens.probe_ids
        with profiled("transform", self.profile):
            seconds, prepared = timed(
                lambda: prepare_model(self.model, self.exp.transform, self.exp.quant, deviation_ids=probe_ids),
                self.device,
            )
            seconds += timed(prepared.fp_deviation, self.device)[0]
        fp_seconds = median_seconds(lambda: self.fp.forward(probe_ids, PROBE_SEQUENCES), self.repeats, self.device)
        self.report.row("transform", seconds, f"FP forward, {tuple(probe_ids.shape)}", fp_seconds,
                        f"{self.exp.transform_name}: 2 forwards inside (reference, deviation)")
        return prepared

    def calibrate(self, prepared: PreparedModel, fp_reference: torch.nn.Module) -> tuple[float, float]:
        """calibrate's seconds without the FP twins timed inside it, and the seconds of its bound/error and
        KL measurement; rows for its steps, learning and fold."""
        calib, calib_ids = self.exp.calib, self.tokens.calib_ids
        clock = StepClock(lambda step: self.fp.forward_backward(calib_ids[batch_indices(calib, calib_ids.shape[0], step)]))
        with clock, profiled("calibrate", self.profile):
            run = partial(
                calibrate, prepared, fp_reference, calib_ids, calib, self.exp.optim, None,
                heldout_ids=self.tokens.heldout_ids, on_step=clock.on_step,
            )
            seconds, result = timed(run, self.device)
        seconds -= clock.excluded
        if clock.fp:
            shape = (calib.batch_size, calib.seq_len)
            per_epoch = -(-calib.n_samples // calib.batch_size)
            first, later = slice(0, per_epoch), slice(per_epoch, None)
            self.report.row("calib step", statistics.median(clock.steps[first]), f"FP forward+backward, {shape}",
                            statistics.median(clock.fp[first]), f"median of {len(clock.steps[first])}, epoch 1")
            if clock.steps[later]:
                self.report.row("calib step, later epochs", statistics.median(clock.steps[later]), "(same)",
                                statistics.median(clock.fp[later]),
                                f"median of {len(clock.steps[later])}, FP logits cached")
        note = f"skipped: {result.skipped}" if result.skipped else f"{result.steps} steps, {calib.mode}"
        self.report.row("calibrate", seconds, "", None, note)
        self.report.row("learning", clock.learning, "", None, "the optimizer steps, without their FP twins")
        self.report.row("fold maps", clock.fold, "", None, "freeze_model at the end of calibrate")
        return seconds, result.measure_seconds or 0.0

    def gptq(self, prepared: PreparedModel) -> float:
        quant, calib_ids = self.exp.quant, self.tokens.calib_ids
        seconds = 0.0
        with profiled("gptq", self.profile):
            if quant.weight_quantizer == "gptq" and quant.weight_format is not None:
                seconds = timed(lambda: gptq_quantize_model(prepared, calib_ids, quant, self.exp.gptq), self.device)[0]
            set_quantization(self.model, weights=quant.weight_format is not None, acts=quant.act_format is not None)
        fp_seconds = median_seconds(lambda: self.fp.forward(calib_ids, self.exp.calib.batch_size), self.repeats, self.device)
        self.report.row("GPTQ", seconds, f"FP forward, calibration set {tuple(calib_ids.shape)}", fp_seconds)
        return seconds

    def perplexities(self) -> float:
        """The quantized model's perplexity on each text, alternated with the FP model's; one window
        of each warms both up first."""
        seq_len = self.tokens.eval_seq_len
        batch = self.exp.eval.batch_size if isinstance(self.exp.eval.batch_size, int) else 1
        total = 0.0
        for text in self.tokens.ppl_texts:
            window = text.ids[:seq_len]
            evaluate.perplexity(self.model, window, seq_len, 1)
            evaluate.perplexity(self.fp.model, window, seq_len, 1)
            with profiled("eval", self.profile):
                quantized, full = paired_medians(
                    lambda text=text: evaluate.perplexity(self.model, text.ids, seq_len, batch),
                    lambda text=text: evaluate.perplexity(self.fp.model, text.ids, seq_len, batch),
                    self.repeats, self.device,
                )
            self.report.row("quantized ppl", quantized,
                            f"FP perplexity, {text.name} {text.ids.numel()} tokens at {seq_len}", full,
                            f"median of {max(self.repeats, 1)}, alternated")
            total += quantized
        return total

    def tasks(self, tokenizer: Any) -> float:
        if self.exp.eval.tasks == ():
            return 0.0
        seconds = timed(
            lambda: evaluate.zero_shot(self.model, tokenizer, self.exp.eval, self.tokens.eval_seq_len), self.device
        )[0]
        self.report.row("lm-eval tasks", seconds, "", None, "no FP twin")
        return seconds


def bench(
    overrides: Sequence[str], *, presets: Sequence[str] = PRESETS, repeats: int = 2, tasks: bool = False,
    profile: str | None = None,
) -> Report:
    exp = experiment(overrides)
    device = resolve_device(exp.device)
    torch.manual_seed(exp.seed)
    load_before = os.getloadavg()

    name, _ = model_source(exp)
    model, tokenizer = load_model_checked(exp, device, name)
    tokens = run_tokens(exp, model, tokenizer, device)
    fp = FullPrecision(model, device)  # timing only
    fp_reference = copy.deepcopy(fp.model)  # calibrate's reference, as run.py keeps one FP copy
    fp.forward(tokens.probe_ids, PROBE_SEQUENCES)  # warm-up, of both copies
    Reference.of(model, tokens.probe_ids)

    report = Report(header="")
    report.presets = transform_presets(model, exp, presets, overrides, tokens.probe_ids, device)
    stages = _Bench(exp, device, model, tokens, fp, report, repeats, profile)
    prepared = stages.transform()
    seconds, measure_seconds = stages.calibrate(prepared, fp_reference)
    seconds += stages.gptq(prepared)
    del fp_reference
    seconds += stages.perplexities()
    if tasks:
        seconds += stages.tasks(tokenizer)
    report.row("run (sum of stages)", seconds, "", None,
               "without loading and lm-eval tasks" if not tasks else "without loading")
    report.row("measurement", measure_seconds, "the run (sum of stages)", seconds,
               "bound/error and KL, inside calibrate" if exp.calib.measure else "calib.measure=false")

    calib = exp.calib
    report.header = (
        f"model={exp.model.name} quant={exp.quant_name} transform={exp.transform_name} device={device} "
        f"calib {calib.n_samples}x{calib.seq_len} batch {calib.batch_size} epochs {calib.epochs}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load_before[0]:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after; {os.cpu_count()} CPUs"
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see docs/perf_pipeline.md)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of the repeatable timings (medians)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", nargs="*", default=list(PRESETS), choices=PRESETS,
                        help="transform presets timed in the second table (none: skip it)")
    parser.add_argument("--tasks", action="store_true", help="also time the lm-eval tasks (long on a CPU)")
    parser.add_argument("--profile", choices=("transform", "calibrate", "gptq", "eval"), default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = bench(
        [f"device={args.device}", *args.overrides], presets=args.presets, repeats=args.repeats, tasks=args.tasks,
        profile=args.profile,
    )
    print(report.render())


if __name__ == "__main__":
    main()
