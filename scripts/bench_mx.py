"""Benchmark latmix.mx.quantize against the memory-bandwidth floor (x.clone()) and torchao.

For a size x size tensor in float32 and bfloat16, on CPU and on CUDA when present, prints per format
the median time of quantize (fused path), its effective bandwidth (bytes read + written), its ratio
to x.clone(), torchao's quantize-dequantize round trip (MXTensor.to_mx(..., FLOOR).dequantize, or
NVFP4Tensor for nvfp4) and latmix's speedup over it, plus the one-off first-call (compile) time.

    .venv/bin/python scripts/bench_mx.py [--size 4096] [--repeats 7] [--formats mxfp4_e2m1 nvfp4] [--devices cuda]
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable

import torch
from tabulate import tabulate

from latmix.formats import FORMATS, get_format
from latmix.mx import quantize
from latmix.timing import paired_medians, timed

CANONICAL_FORMATS = sorted({fmt.name for fmt in FORMATS.values()}, key=list(FORMATS).index)


def torchao_round_trip(fmt: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchao's quantize + dequantize for fmt, or None when torchao or that format is missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.prototype.mx_formats.config import ScaleCalculationMode
            from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
            from torchao.prototype.mx_formats.mx_tensor import MXTensor
            from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    except ImportError:
        return None
    if fmt == "nvfp4":
        return lambda x: NVFP4Tensor.to_nvfp4(
            x, 16, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax())
        ).dequantize(x.dtype)
    elements = {
        "mxfp8_e4m3": torch.float8_e4m3fn,
        "mxfp8_e5m2": torch.float8_e5m2,
        "mxfp6_e3m2": DTYPE_FP6_E3M2,
        "mxfp6_e2m3": DTYPE_FP6_E2M3,
        "mxfp4_e2m1": torch.float4_e2m1fn_x2,
    }
    if fmt not in elements:
        return None
    return lambda x: MXTensor.to_mx(x, elements[fmt], 32, scaling_mode=ScaleCalculationMode.FLOOR).dequantize(
        x.dtype
    )


def milliseconds(s: float) -> str:
    return f"{s * 1e3:.3g}"


def bench_one(x: torch.Tensor, fmt: str, repeats: int) -> list[object]:
    device, traffic = x.device, 2 * x.numel() * x.element_size()
    first_call_s = timed(lambda: quantize(x, fmt), device)[0]
    latmix_s, clone_s = paired_medians(lambda: quantize(x, fmt), x.clone, repeats, device)
    reference = torchao_round_trip(fmt)
    torchao_s = None
    if reference is not None:
        try:
            reference(x)
        except Exception as error:  # torchao's kernels for this torch/device: a column, not a failed benchmark
            print(f"torchao {fmt} on {device.type} failed ({type(error).__name__}: {error}); shown as n/a")
            reference = None
    if reference is not None:
        torchao_s, latmix_again_s = paired_medians(lambda: reference(x), lambda: quantize(x, fmt), 3, device)
    return [
        fmt,
        str(x.dtype).removeprefix("torch."),
        device.type,
        milliseconds(latmix_s),
        f"{traffic / latmix_s / 1e9:.1f}",
        milliseconds(clone_s),
        f"{latmix_s / clone_s:.2f}",
        "n/a" if torchao_s is None else milliseconds(torchao_s),
        "n/a" if torchao_s is None else f"{torchao_s / latmix_again_s:.0f}",
        f"{first_call_s:.1f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=4096, help="the tensor is size x size")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--formats", nargs="+", default=CANONICAL_FORMATS, help="format names (aliases ok)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--devices", nargs="+", default=["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
    args = parser.parse_args()
    formats = [get_format(name).name for name in args.formats]

    devices = [torch.device(name) for name in args.devices]
    header = ["format", "dtype", "device", "ms", "GB/s", "clone ms", "x clone", "torchao ms", "x faster",
              "first call s"]  # fmt: skip
    rows = []
    for device in devices:
        for dtype_name in args.dtypes:
            x = torch.randn(args.size, args.size, device=device).to(getattr(torch, dtype_name))
            rows.extend(bench_one(x, fmt, args.repeats) for fmt in formats)
    print(f"quantize of a {args.size}x{args.size} tensor, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads; 'x clone' = quantize / clone() timed alternately, "
          "'x faster' = torchao / quantize timed alternately")  # fmt: skip
    print(tabulate(rows, headers=header, tablefmt="github"))


if __name__ == "__main__":
    main()
