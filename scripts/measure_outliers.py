"""Measure activation outliers at the quantization points of a causal LM (the inputs of decoder linears).

For each decoder layer and each linear input (q/k/v share one input, gate/up share one) it reports,
over a few calibration windows:

    max/median   the largest per-channel max |x| over the median channel's: ~1-10 for a
                 well-behaved model, ~100 and more for real LLMs with massive channels
    kurtosis     of all activation values (3 for a Gaussian; heavy tails give far more)

With --inject N,SCALE (repeatable) it also measures the model after
latmix.models.inject_channel_outliers(model, n_channels=N, scale=SCALE), the function-preserving
reparametrization behind model=tiny_outliers, and checks that the logits are unchanged.

    python scripts/measure_outliers.py --model models/tiny-llama --inject 4,32 --inject 8,64
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import nn

from latmix.local_tasks import text_path
from latmix.models import get_adapter, inject_channel_outliers, load_model

REPO = Path(__file__).resolve().parents[1]


def quantization_points(model: nn.Module) -> dict[str, nn.Linear]:
    """One linear per distinct input: its input is the activation a quantized GEMM would see."""
    adapter = get_adapter(model)
    points = {}
    for i, layer in enumerate(adapter.layers()):
        points[f"{i}.qkv_in"] = adapter.attn_readers(layer)[0]
        points[f"{i}.o_in"] = adapter.attn_writer(layer)
        points[f"{i}.gate_up_in"] = adapter.mlp_readers(layer)[0]
        points[f"{i}.down_in"] = adapter.mlp_writer(layer)
    return points


def outlier_stats(x: torch.Tensor) -> dict[str, float]:
    x = x.reshape(-1, x.shape[-1]).double()
    channel_max = x.abs().amax(dim=0)
    centered = x.flatten() - x.mean()
    kurtosis = (centered**4).mean() / (centered**2).mean() ** 2
    return {
        "max_over_median": (channel_max.max() / channel_max.median()).item(),
        "max_abs": channel_max.max().item(),
        "kurtosis": kurtosis.item(),
    }


@torch.no_grad()
def measure(model: nn.Module, input_ids: torch.Tensor) -> tuple[dict[str, dict[str, float]], torch.Tensor]:
    """Outlier statistics at every quantization point, and the logits (to check function preservation)."""
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = [linear.register_forward_pre_hook(lambda _m, args, name=name: captured.setdefault(name, []).append(args[0]))
             for name, linear in quantization_points(model).items()]
    try:
        logits = model(input_ids.to(model.device)).logits
    finally:
        for hook in hooks:
            hook.remove()
    return {name: outlier_stats(torch.cat(xs)) for name, xs in captured.items()}, logits


def calibration_windows(tokenizer, n_windows: int, seq_len: int) -> torch.Tensor:
    ids = tokenizer(text_path("calibration").read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids[: n_windows * seq_len].reshape(n_windows, seq_len)


def summarize(stats: dict[str, dict[str, float]]) -> dict[str, float]:
    ratios = [s["max_over_median"] for s in stats.values()]
    kurtoses = [s["kurtosis"] for s in stats.values()]
    return {"max_over_median_max": max(ratios), "max_over_median_median": float(torch.tensor(ratios).median()),
            "kurtosis_max": max(kurtoses), "kurtosis_median": float(torch.tensor(kurtoses).median())}


def parse_injection(text: str) -> tuple[int, float]:
    try:
        n, scale = text.split(",")
        return int(n), float(scale)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--inject takes N_CHANNELS,SCALE (e.g. 4,32), got {text!r}") from error


def print_table(label: str, stats: dict[str, dict[str, float]]) -> None:
    print(f"\n{label}\n| point | max/median | max abs | kurtosis |\n|---|---|---|---|")
    for name, s in stats.items():
        print(f"| {name} | {s['max_over_median']:.1f} | {s['max_abs']:.2f} | {s['kurtosis']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "tiny-llama"))
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--inject", type=parse_injection, action="append", default=[],
                        metavar="N,SCALE", help="also measure after inject_channel_outliers(N channels, SCALE)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write all statistics here")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(args.model, dtype=torch.float32, device=device)
    input_ids = calibration_windows(tokenizer, args.windows, args.seq_len)
    stats, reference_logits = measure(model, input_ids)
    print_table("trained model", stats)
    results = {"trained": {"summary": summarize(stats), "points": stats}}
    for n_channels, scale in args.inject:
        variant = copy.deepcopy(model)
        inject_channel_outliers(variant, n_channels=n_channels, scale=scale, seed=args.seed)
        variant_stats, logits = measure(variant, input_ids)
        max_logit_diff = (logits - reference_logits).abs().max().item()
        label = f"inject n_channels={n_channels} scale={scale}"
        print_table(f"{label} (max |logit diff| {max_logit_diff:.2e})", variant_stats)
        results[label] = {"summary": summarize(variant_stats), "points": variant_stats,
                          "max_logit_diff": max_logit_diff}
    print("\n| model | max/median (max over points) | max/median (median) | kurtosis (max) | kurtosis (median) |")
    print("|---|---|---|---|---|")
    for label, r in results.items():
        s = r["summary"]
        print(f"| {label} | {s['max_over_median_max']:.1f} | {s['max_over_median_median']:.1f} | "
              f"{s['kurtosis_max']:.1f} | {s['kurtosis_median']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
