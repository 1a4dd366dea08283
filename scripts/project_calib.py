"""Project a calib=paper calibration on a large model from the step costs measured on SmolLM2-135M.

    python scripts/project_calib.py                                   # Llama-3-8B, calib=paper, 200-400 TFLOP/s
    python scripts/project_calib.py --target llama3-70b --tflops 300
    python scripts/project_calib.py --step-seconds 30.2 --fp-seconds 15.6   # your own bench_pipeline.py row
    python scripts/project_calib.py --target llama3-70b --step-seconds 2.63 --fp-seconds 0.746 \
        --measured-on llama3-8b --measured-batch 4 2048 --step-includes-recompute   # from the H200's 8B step

What is measured (scripts/bench_pipeline.py on SmolLM2-135M, docs/perf_pipeline.md) is the ratio of one
end-to-end calibration step to the FP forward+backward of the same batch. That ratio is a property of
the method (quantized forward and backward, the FP forward of the KL target, the maps), so it carries to
a larger model; what does not carry is the machine. The projection therefore counts FLOPs: the target's
FP forward+backward of one calib=paper batch (3x the forward: matmuls over every linear and the lm_head,
plus attention scores), times the measured ratio, plus one forward recomputed under activation
checkpointing (unless the measured step already recomputed: --step-includes-recompute, as a GPU step
measured by bench_calibrate.py does); divided by an effective throughput. It also gives the one FP forward over the
calibration set that the `affine` preset's smoothing start costs (it learns nothing). The SmolLM2 row
shows the throughput the measurement itself implies, as a check on the FLOP count.
Imports no torch.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from tabulate import tabulate

CALIB = Path(__file__).resolve().parent.parent / "conf" / "calib"
# Measured by bench_pipeline.py on SmolLM2-135M, MXFP4 W4A4, transform=affine, batch 4 x 256, epoch 1
# (docs/perf_pipeline.md): one calibration step and the FP forward+backward of its batch, in seconds.
MEASURED_STEP_SECONDS = 30.2
MEASURED_FP_SECONDS = 15.6
MEASURED_BATCH = (4, 256)


@dataclass(frozen=True)
class Shape:
    """What a Llama-family model's FLOPs depend on."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int

    def linear_params(self) -> int:
        """Parameters every token multiplies: the 7 linears of each block and the lm_head."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attention + mlp) + self.hidden * self.vocab

    def forward_flops(self, batch: int, seq_len: int) -> float:
        """Matmul FLOPs of one forward: 2 per linear parameter per token, plus QK^T and AV (causal: half)."""
        tokens = batch * seq_len
        attention = 2 * 2 * self.layers * self.heads * self.head_dim * seq_len * tokens / 2
        return 2.0 * self.linear_params() * tokens + attention


SHAPES = {
    "smollm2-135m": Shape(hidden=576, layers=30, intermediate=1536, vocab=49152, heads=9, kv_heads=3, head_dim=64),
    "llama3-8b": Shape(hidden=4096, layers=32, intermediate=14336, vocab=128256, heads=32, kv_heads=8, head_dim=128),
    "llama3-70b": Shape(hidden=8192, layers=80, intermediate=28672, vocab=128256, heads=64, kv_heads=8, head_dim=128),
}


def calib_settings(name: str) -> dict:
    """conf/calib/<name>.yaml over conf/calib/default.yaml (its only default)."""
    merged = OmegaConf.merge(OmegaConf.load(CALIB / "default.yaml"), OmegaConf.load(CALIB / f"{name}.yaml"))
    merged.pop("defaults", None)
    return OmegaConf.to_container(merged, resolve=False)


def steps_of(calib: dict) -> int:
    if calib["steps"] is not None:
        return int(calib["steps"])
    return int(calib["epochs"]) * math.ceil(calib["n_samples"] / calib["batch_size"])


def projection(
    target: Shape, calib: dict, step_ratio: float, tflops: list[float], measured: Shape = SHAPES["smollm2-135m"],
    fp_seconds: float = MEASURED_FP_SECONDS, measured_batch: tuple[int, int] = MEASURED_BATCH,
    step_includes_recompute: bool = False, measured_name: str = "SmolLM2",
) -> list[list]:
    """Rows of (what, FLOPs, seconds at each throughput). A step measured with activation checkpointing
    (step_includes_recompute) has its recomputed forward in the ratio already: none is added."""
    batch, seq_len = calib["batch_size"], calib["seq_len"]
    forward = target.forward_flops(batch, seq_len)
    recompute = forward if calib["grad_checkpointing"] and not step_includes_recompute else 0.0
    step = step_ratio * 3 * forward + recompute
    steps = steps_of(calib)
    smoothing = target.forward_flops(calib["n_samples"], seq_len)
    implied = 3 * measured.forward_flops(*measured_batch) / fp_seconds
    rows = [
        [f"measured: FP forward+backward on {measured_name}, {measured_batch[0]}x{measured_batch[1]}",
         3 * measured.forward_flops(*measured_batch),
         f"{fp_seconds} s measured = {_throughput(implied)}"],
        [f"FP forward+backward, {batch}x{seq_len}", 3 * forward, *_seconds(3 * forward, tflops)],
        [f"one calibration step (x{step_ratio:.2f}{' + recompute' if recompute else ''})", step,
         *_seconds(step, tflops)],
        [f"calibration, {steps} steps (end to end)", steps * step, *_minutes(steps * step, tflops)],
        [f"affine's smoothing start: one FP forward, {calib['n_samples']}x{seq_len}", smoothing,
         *_seconds(smoothing, tflops)],
    ]
    return rows


def _throughput(flops_per_second: float) -> str:
    return (f"{flops_per_second / 1e12:.0f} TFLOP/s" if flops_per_second >= 1e12
            else f"{flops_per_second / 1e9:.0f} GFLOP/s")


def _seconds(flops: float, tflops: list[float]) -> list[str]:
    return [f"{flops / (t * 1e12):.2f} s" for t in tflops]


def _minutes(flops: float, tflops: list[float]) -> list[str]:
    return [f"{flops / (t * 1e12) / 60:.1f} min" for t in tflops]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--calib", default="paper", help="a conf/calib preset (default: paper, 128 x 2048)")
    parser.add_argument("--step-seconds", type=float, default=MEASURED_STEP_SECONDS,
                        help="one measured calibration step on SmolLM2 (bench_pipeline.py 'calib step')")
    parser.add_argument("--fp-seconds", type=float, default=MEASURED_FP_SECONDS,
                        help="the FP forward+backward of the same batch (its 'FP seconds')")
    parser.add_argument("--measured-on", choices=sorted(SHAPES), default="smollm2-135m",
                        help="the model shape the step was measured on (only the implied-throughput row uses it)")
    parser.add_argument("--measured-batch", type=int, nargs=2, default=list(MEASURED_BATCH),
                        metavar=("SEQUENCES", "SEQ_LEN"), help="the measured step's batch")
    parser.add_argument("--step-includes-recompute", action="store_true",
                        help="the measured step ran with activation checkpointing (a GPU step from "
                        "bench_calibrate.py): add no recomputed forward")
    parser.add_argument("--tflops", type=float, nargs="+", default=[200.0, 400.0],
                        help="effective throughputs of the target machine, TFLOP/s (bf16 H100: 200-400)")
    args = parser.parse_args()
    calib = calib_settings(args.calib)
    ratio = args.step_seconds / args.fp_seconds
    rows = projection(SHAPES[args.target], calib, ratio, args.tflops, measured=SHAPES[args.measured_on],
                      fp_seconds=args.fp_seconds, measured_batch=tuple(args.measured_batch),
                      step_includes_recompute=args.step_includes_recompute, measured_name=args.measured_on)
    for row in rows:
        row[1] = f"{row[1]:.2e}"
    print(f"{args.target}, calib={args.calib} ({calib['n_samples']}x{calib['seq_len']}, batch {calib['batch_size']}, "
          f"{steps_of(calib)} steps); measured step / FP forward+backward on {args.measured_on} = {ratio:.2f}")
    headers = ["what", "FLOPs", *[f"at {t:g} TFLOP/s" for t in args.tflops]]
    print(tabulate(rows, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
