"""Cost of one calibration step as the hidden size grows (a benchmark, not a test).

For each hidden size d, a one-block Llama with random weights (head_dim 128, intermediate 3.5 d as in
Llama-3-8B, a small vocabulary) is prepared with MXFP4 W4A4 and one transform family on the residual
stream (T1) and the attention v->o map (T2), then calibrated for a few steps in each mode. Seconds per
optimizer step (steps after the first, timed through calibrate's on_step callback) and peak memory are
printed as a markdown table. One block is what layer_wise holds at a time; end to end multiplies the
block cost by the number of blocks (see docs/calibration.md for the Llama-3-8B projection).

    python scripts/bench_calibrate.py --sizes 256 512 1024 2048 4096 --seq-len 2048 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import itertools
import resource
import statistics
import time

import torch
from tabulate import tabulate
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers import AutoModelForCausalLM, LlamaConfig

from latmix.calibrate import calibrate
from latmix.quantize import prepare_model
from latmix.settings import CalibConfig, OptimConfig, QuantConfig, TransformConfig

# (label, family kwargs for residual and attn_vo); affine T1 on the residual needs approximate: true.
TRANSFORMS = {
    "affine qr": {"family": "affine", "parametrization": "qr", "init": "hadamard"},
    "affine lu": {"family": "affine", "parametrization": "lu", "init": "hadamard"},
    "affine kronecker": {"family": "affine", "parametrization": "kronecker", "init": "hadamard"},
    "affine block_diag": {"family": "affine", "parametrization": "block_diag", "init": "block_hadamard"},
    "rotation": {"family": "rotation", "learnable": True, "init": "hadamard"},
}
MODES = {"end_to_end": "kl", "layer_wise": "block_mse"}
HEAD_DIM = 128
VOCAB = 1024


def one_block_llama(d: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    heads = max(d // HEAD_DIM, 1)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=d,
        intermediate_size=int(3.5 * d) // 32 * 32,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        head_dim=HEAD_DIM,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # CPU: the process's peak resident set (monotone over the whole run, so an upper bound per row).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_one(d: int, label: str, spec: dict, mode: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    fp_model = one_block_llama(d, args.dtype, device)
    prepared = prepare_model(
        copy.deepcopy(fp_model),
        TransformConfig({"residual": spec, "attn_vo": spec}, approximate=spec["family"] == "affine"),
        QuantConfig(weight_format="mxfp4", act_format="mxfp4"),
    )
    ids = torch.randint(0, VOCAB, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    cfg = CalibConfig(
        mode=mode,
        objective=MODES[mode],
        source="local",
        epochs=args.steps,
        batch_size=args.samples,
        n_samples=args.samples,
        seq_len=args.seq_len,
        checkpoint_every=10**9,
    )
    stamps: list[float] = []

    def stamp() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # Every optimizer step, in either mode, stamps the clock.
    handle = register_optimizer_step_post_hook(lambda *_: stamp())
    try:
        calibrate(prepared, fp_model, ids, cfg, OptimConfig(), None)
    finally:
        handle.remove()
    per_step = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "d": d,
        "transform": label,
        "mode": mode,
        "s/step": round(statistics.median(per_step), 4) if per_step else float("nan"),
        "peak GiB": round(peak_memory_gib(device), 2),
        "tokens/step": args.samples * args.seq_len,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--transforms", nargs="+", default=list(TRANSFORMS), choices=list(TRANSFORMS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=1, help="sequences per step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    rows = []
    for d in args.sizes:
        for label in args.transforms:
            for mode in args.modes:
                rows.append(bench_one(d, label, TRANSFORMS[label], mode, args))
                print(rows[-1], flush=True)
    print(tabulate(rows, headers="keys", tablefmt="github"))


if __name__ == "__main__":
    main()
