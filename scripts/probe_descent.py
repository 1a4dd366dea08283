"""Does a step along the straight-through gradient lower the quantized model's KL? A line probe.

Learning the affine maps end to end moved SmolLM2's perplexity by less than the seed spread (README,
ablation). This asks why, at the start the calibration learns from. It loads and prepares a model as
run.py does (trailing Hydra overrides; default SmolLM2-135M, MXFP4, transform=affine), gives the
maps their start (calib.smooth_alpha), and sees the model as end-to-end calibration does (weights
unquantized when GPTQ follows, the maps on the activations). On the first calibration batch it takes
the KL to the full-precision model and its straight-through gradient g over every learnable
parameter, then moves all of them together by a step of size eta along a direction and measures the
KL again, on that batch and on the other calibration sequences:

    sign       -sign(g): exactly Adam's first step at lr = eta, what the calibration does
    gradient   -g / max|g|: steepest descent, the largest entry moving by eta
    random     random sign patterns (--randoms of them): what any move of that size does, the noise floor

If the sign step lowers the KL on the batch but not on the other sequences, learning overfits the
batch; if it lowers neither more than a random step does, the gradient that the MX rounding lets
through does not point downhill at steps that change anything.

With calib.rounding=noise the probe looks at the noise objective instead (mx.with_rounding_noise):
every KL is the mean over --draws fixed noise draws (the same draws at every point, so the objective
is a deterministic function of the maps), the gradient is that mean's, and each row also gives the
KL on the other sequences with round to nearest, which is what the deployed model sees.

    .venv/bin/python scripts/probe_descent.py                                  # SmolLM2, MXFP4, affine
    .venv/bin/python scripts/probe_descent.py --steps 1e-4 1e-3 model=tiny quant=nvfp4
    .venv/bin/python scripts/probe_descent.py --draws 4 calib.rounding=noise     # the noise objective

Prints a markdown table (ΔKL in % of the start's KL) and writes it with every number to --out
(.md, .json). Takes OMP_NUM_THREADS and the device from the environment and the config.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from latmix import quantize
from latmix.calibrate.learn import calibration_view
from latmix.calibrate.measure import quant_points
from latmix.calibrate.smooth import smooth_init
from latmix.calibrate.trainer import flat, matrices_built_once, trainable
from latmix.config import compose_experiment
from latmix.data import calibration_batches
from latmix.experiment import load_model_checked, model_source, resolve_device, seed_everything
from latmix.losses import next_token_kl
from latmix.models import blocks
from latmix.settings import Experiment

REPO = Path(__file__).resolve().parents[1]
DIRECTIONS = ("sign", "gradient", "random")
DEFAULT_STEPS = (1e-5, 1e-4, 1e-3, 1e-2)
# The noise draws of the noise objective are seeded from here, one seed per draw.
NOISE_SEED = 1234


class Probe:
    """The prepared model at its start, the full-precision logits, and the KL on chosen sequences."""

    def __init__(self, exp: Experiment, draws: int = 4) -> None:
        seed_everything(exp.seed)
        device = resolve_device(exp.device)
        model, tokenizer = load_model_checked(exp, device, model_source(exp)[0])
        fp_model = copy.deepcopy(model).eval().requires_grad_(False)
        calib = exp.calib
        self.ids, _ = calibration_batches(tokenizer, calib.source, calib.n_samples, calib.seq_len, exp.seed,
                                          path=calib.path)
        self.batch_size = calib.batch_size
        if self.ids.shape[0] < 2 * self.batch_size:
            raise SystemExit(f"calib.n_samples={self.ids.shape[0]} leaves no sequences beside the first batch "
                             f"of {self.batch_size}; use at least {2 * self.batch_size}")
        self.prepared = quantize.prepare_model(model, exp.transform, exp.quant)
        model.eval()
        if calib.smooth_alpha > 0:
            smooth_init(self.prepared, self.ids, calib.smooth_alpha, calib.batch_size)
        self.params = flat(trainable(self.prepared, quant_points(model), learn_clipping=False))
        if not self.params:
            raise SystemExit(f"transform={exp.transform_name} has nothing to learn: probe a learnable preset")
        self.learned = [t for t in self.prepared.transforms.values() if any(p.requires_grad for p in t.parameters())]
        self.device = blocks.input_device(model)
        with torch.no_grad():
            self.fp_logits = [fp_model(chunk.to(self.device), use_cache=False).logits for chunk in self.batches()]
        self.rtn_weights = calib.quantize_weights
        self.online_maps = calib.online_maps
        self.rounding = calib.rounding
        self.draws = draws if self.rounding == "noise" else 1

    def batches(self) -> list[torch.Tensor]:
        return list(self.ids.split(self.batch_size))

    def _as_calibrated(self, rounding: str) -> contextlib.ExitStack:
        """The model as end-to-end calibration runs it, rounding as given, the maps' matrices built once."""
        stack = contextlib.ExitStack()
        stack.enter_context(calibration_view(self.prepared.model, rtn_weights=self.rtn_weights,
                                             online_maps=self.online_maps))
        if rounding == "noise":
            stack.enter_context(quantize.rounding_noise(self.prepared.model))
        stack.enter_context(matrices_built_once(self.learned))
        return stack

    def kl_draws(self, index: int, rounding: str | None = None) -> Iterator[torch.Tensor]:
        """The KL on one batch under each fixed noise draw (one value when rounding to nearest)."""
        rounding = rounding or self.rounding
        ids = self.batches()[index].to(self.device)
        for draw in range(self.draws if rounding == "noise" else 1):
            with torch.random.fork_rng(), self._as_calibrated(rounding):
                torch.manual_seed(NOISE_SEED + draw)
                logits = self.prepared.model(ids, use_cache=False).logits
                yield next_token_kl(logits, self.fp_logits[index])

    def kl(self, index: int, rounding: str | None = None) -> float:
        values = [float(kl) for kl in self.kl_draws(index, rounding)]
        return sum(values) / len(values)

    def gradient(self) -> dict[str, torch.Tensor]:
        for p in self.params.values():
            p.grad = None
        for kl in self.kl_draws(0):
            (kl / self.draws).backward()
        return {name: p.grad.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def kls_at(self, direction: dict[str, torch.Tensor], step: float) -> tuple[float, ...]:
        """(KL on the first batch, mean KL on the others) with every parameter moved by step * direction;
        under the noise objective also the mean KL on the others with round to nearest."""
        start = {name: p.detach().clone() for name, p in self.params.items()}
        others = range(1, len(self.batches()))
        try:
            for name, p in self.params.items():
                p.add_(direction[name], alpha=step)
            values = [self.kl(0), sum(self.kl(i) for i in others) / len(others)]
            if self.rounding == "noise":
                values.append(sum(self.kl(i, "nearest") for i in others) / len(others))
        finally:
            for name, p in self.params.items():
                p.copy_(start[name])
        return tuple(values)


def directions(gradient: dict[str, torch.Tensor], randoms: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """The moves the probe steps along, each with its largest entry 1 (module doc); `randoms` random ones."""
    largest = max(float(g.abs().max()) for g in gradient.values())
    if largest == 0:
        raise SystemExit("the straight-through gradient is zero: is anything quantized where the maps act?")
    generator = torch.Generator().manual_seed(seed)
    moves = {
        "sign": {name: -g.sign() for name, g in gradient.items()},
        "gradient": {name: -g / largest for name, g in gradient.items()},
    }
    for draw in range(randoms):
        moves[f"random {draw + 1}"] = {name: (2 * torch.randint(0, 2, g.shape, generator=generator) - 1).to(g)
                                       for name, g in gradient.items()}
    return moves


def probe(exp: Experiment, steps: Sequence[float], randoms: int = 2, seed: int = 0, draws: int = 4) -> dict[str, Any]:
    """The KL at the start, the gradient's size, and one row per (direction, step) (module doc)."""
    lens = Probe(exp, draws)
    unmoved = {name: torch.zeros_like(p) for name, p in lens.params.items()}
    kl_batch, kl_others, *kl_nearest = lens.kls_at(unmoved, 0.0)
    gradient = lens.gradient()
    # The start measured again, after the backward: a change here would be nondeterminism, not the step.
    again_batch, again_others, *_ = lens.kls_at(unmoved, 0.0)
    rows = []
    for name, direction in directions(gradient, randoms, seed).items():
        slope = sum(float((gradient[key] * direction[key]).sum()) for key in gradient)
        for step in steps:
            batch, others, *nearest = lens.kls_at(direction, step)
            print(f"{name} step {step:g}: KL {batch:.4f} on the batch, {others:.4f} on the others", file=sys.stderr)
            rows.append({
                "direction": name, "step": step, "kl_batch": batch, "kl_others": others,
                "first_order_pct": 100 * step * slope / kl_batch,
                "batch_pct": 100 * (batch / kl_batch - 1), "others_pct": 100 * (others / kl_others - 1),
                **({"nearest_others_pct": 100 * (nearest[0] / kl_nearest[0] - 1)} if nearest else {}),
            })
    return {
        "rounding": lens.rounding, "draws": lens.draws,
        "kl_batch": kl_batch, "kl_others": kl_others,
        **({"kl_others_nearest": kl_nearest[0]} if kl_nearest else {}),
        "parameters": sum(p.numel() for p in lens.params.values()),
        "gradient_max": max(float(g.abs().max()) for g in gradient.values()),
        "gradient_l1": sum(float(g.abs().sum()) for g in gradient.values()),
        "repeat_pct": [100 * (again_batch / kl_batch - 1), 100 * (again_others / kl_others - 1)],
        "other_sequences": lens.ids.shape[0] - lens.batch_size, "batch": lens.batch_size,
        "rows": rows,
    }


def report(result: dict[str, Any], command: str) -> str:
    noise = result["rounding"] == "noise"
    objective = f"the noise objective (mean of {result['draws']} fixed draws)" if noise else "round to nearest"
    lines = [
        f"    {command}",
        "",
        f"KL under {objective} at the start: {result['kl_batch']:.4f} on the batch ({result['batch']} sequences), "
        f"{result['kl_others']:.4f} on the other {result['other_sequences']}"
        + (f" ({result['kl_others_nearest']:.4f} rounding to nearest)" if noise else "") + "; "
        f"{result['parameters']} parameters, max |g| {result['gradient_max']:.3g}, sum |g| {result['gradient_l1']:.3g}. "
        "The start measured again changes the KL by {:+.2f}% / {:+.2f}% (nonzero would be nondeterminism).".format(
            *result["repeat_pct"]),
        "",
        "| direction | step | first-order ΔKL % | ΔKL on the batch % | ΔKL on the other sequences % |"
        + (" ΔKL on the others, rounding to nearest % |" if noise else ""),
        "|:--|--:|--:|--:|--:|" + ("--:|" if noise else ""),
    ]
    lines += [f"| {r['direction']} | {r['step']:g} | {r['first_order_pct']:+.2f} | {r['batch_pct']:+.2f} | "
              f"{r['others_pct']:+.2f} |" + (f" {r['nearest_others_pct']:+.2f} |" if noise else "")
              for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=float, nargs="+", default=list(DEFAULT_STEPS), help="step sizes eta")
    parser.add_argument("--randoms", type=int, default=2, help="random directions (the noise floor)")
    parser.add_argument("--direction-seed", type=int, default=0, help="draws the random directions")
    parser.add_argument("--draws", type=int, default=4, help="noise draws averaged per KL (calib.rounding=noise)")
    parser.add_argument("--out", type=Path, default=Path("results/tables/probe_descent"), help="<out>.md, <out>.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py")
    args = parser.parse_args()
    if args.draws < 1:
        raise SystemExit(f"--draws {args.draws}: the noise objective needs at least one draw")
    result = probe(compose_experiment(args.overrides), args.steps, args.randoms, args.direction_seed, args.draws)
    text = report(result, "python scripts/probe_descent.py " + shlex.join(sys.argv[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({**result, "argv": sys.argv[1:]}, indent=2))
    print(text, end="")


if __name__ == "__main__":
    main()
