"""Cost of one calibration step as the hidden size grows (a benchmark, not a test).

For each hidden size d, a Llama with random weights (head_dim 128, intermediate 3.5 d and 4 query heads
per key-value head as in Llama-3-8B; one block and a small vocabulary unless --blocks/--vocab say
otherwise) is prepared with MXFP4 W4A4 and one transform family on the residual stream (T1) and the
attention v->o map (T2), then calibrated for a few steps in each mode, with calibrate's defaults
(activation checkpointing; bfloat16 autocast on CUDA). Printed as a markdown table: seconds per
optimizer step (steps after the first, timed through an optimizer step hook); the FP model's forward
+ backward of the same batch, without checkpointing (the reference of bench_pipeline.py and
project_calib.py); their ratio, end to end only (a layer-wise step is one block's); and peak memory. A
row that runs out of device memory says so. One block is what layer_wise holds at a time; end to end
multiplies the block cost by the number of blocks (see docs/calibration.md for the Llama-3-8B
projection).

    python scripts/bench_calibrate.py --sizes 256 512 1024 2048 4096 --seq-len 2048 --device cuda
    # Llama-3-8B's shape, one calib=paper batch (4 x 2048):
    python scripts/bench_calibrate.py --sizes 4096 --blocks 32 --vocab 128256 --samples 4 --seq-len 2048 \
        --transforms "affine qr" --modes end_to_end --device cuda
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
from latmix.timing import median_seconds, synchronize

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


def random_llama(d: int, blocks: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    heads = max(d // HEAD_DIM, 1)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=int(3.5 * d) // 32 * 32,
        num_hidden_layers=blocks,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        head_dim=HEAD_DIM,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    # Initialised where it runs: an 8B model's random init on the CPU alone takes minutes.
    with device:
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # CPU: the process's peak resident set (monotone over the whole run, so an upper bound per row).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fp_forward_backward_seconds(fp_model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    """Median seconds of the FP model's forward + backward (weight gradients) of one batch."""
    device = next(fp_model.parameters()).device
    fp_model.requires_grad_(True)

    def forward_backward() -> None:
        fp_model.zero_grad(set_to_none=True)
        fp_model(ids.to(device), use_cache=False).logits.float().logsumexp(-1).mean().backward()

    forward_backward()  # warms up
    seconds = median_seconds(forward_backward, repeats, device)
    fp_model.zero_grad(set_to_none=True)
    fp_model.requires_grad_(False)
    return seconds


def bench_one(d: int, label: str, spec: dict, mode: str, args: argparse.Namespace) -> dict:
    tokens = args.samples * args.seq_len
    row = {"d": d, "blocks": args.blocks, "transform": label, "mode": mode, "tokens/step": tokens,
           "micro-batch": args.micro_batch or args.samples}  # fmt: skip
    try:
        return row | measure(d, spec, mode, args)
    except torch.OutOfMemoryError:
        pass
    torch.cuda.empty_cache()  # outside the handler, whose traceback still holds the row's tensors
    return row | {"s/step": "out of memory"}


def measure(d: int, spec: dict, mode: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    fp_model = random_llama(d, args.blocks, args.vocab, args.dtype, device)
    prepared = prepare_model(
        copy.deepcopy(fp_model),
        TransformConfig({"residual": spec, "attn_vo": spec}, approximate=spec["family"] == "affine"),
        QuantConfig(weight_format="mxfp4", act_format="mxfp4"),
    )
    ids = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    cfg = CalibConfig(
        mode=mode,
        objective=MODES[mode],
        source="local",
        epochs=args.steps,
        batch_size=args.samples,
        n_samples=args.samples,
        micro_batch_size=args.micro_batch,
        seq_len=args.seq_len,
        checkpoint_every=10**9,
    )
    stamps: list[float] = []

    def stamp() -> None:
        synchronize(device)
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
    step = statistics.median(b - a for a, b in itertools.pairwise(stamps)) if len(stamps) > 1 else float("nan")
    peak = peak_memory_gib(device)
    del prepared
    fp = fp_forward_backward_seconds(fp_model, ids, repeats=2)
    # A layer-wise step is one block's: only an end-to-end step compares with the whole model's.
    ratio = round(step / fp, 2) if mode == "end_to_end" else ""
    return {"s/step": round(step, 4), "FP fwd+bwd s": round(fp, 4), "x FP": ratio, "peak GiB": round(peak, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--transforms", nargs="+", default=list(TRANSFORMS), choices=list(TRANSFORMS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--blocks", type=int, default=1, help="decoder blocks (Llama-3-8B: 32)")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size (Llama-3-8B: 128256)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=1, help="sequences per step")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="sequences per forward/backward (calib.micro_batch_size; default: all of a step's)")
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
