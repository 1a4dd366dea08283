"""Benchmark the orthogonal factor of the qr/svd maps: exp of a skew matrix, forward + backward.

Compares latmix.transforms.skew_exp (matrix_exp forward, backward through the eigendecomposition) with
torch.linalg.matrix_exp's own autograd (which exponentiates a 2s x 2s block matrix), for one s x s
generator at each size: median seconds of forward and backward, their ratio, and the largest
difference between the two gradients relative to the largest gradient entry. The generator is a
random skew matrix of spectral radius about --scale (a learned map is near 0; 0 is the start).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_skew_exp.py [--sizes 64 576 1536] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from tabulate import tabulate

from latmix.transforms import skew_exp


def _matrix_exp_autograd(g: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_exp((g - g.transpose(-1, -2)) / 2)


def _timed(exp: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor, upstream: torch.Tensor) -> tuple:
    """(forward seconds, backward seconds, gradient) of one exp of g."""
    g = g.detach().clone().requires_grad_()
    synchronize = torch.cuda.synchronize if g.is_cuda else (lambda: None)
    synchronize()
    start = time.perf_counter()
    value = exp(g)
    synchronize()
    forward = time.perf_counter() - start
    (value * upstream).sum().backward()
    synchronize()
    return forward, time.perf_counter() - start - forward, g.grad


def bench(sizes: list[int], repeats: int, scale: float, device: str) -> list[list[object]]:
    rows = []
    for size in sizes:
        generator = torch.Generator().manual_seed(size)
        g = (scale / size**0.5 * torch.randn(size, size, generator=generator)).to(device)
        upstream = torch.randn(size, size, generator=generator).to(device)
        ours, theirs = ([_timed(exp, g, upstream) for _ in range(repeats + 1)][1:]  # the first call warms up
                        for exp in (skew_exp, _matrix_exp_autograd))
        grad_gap = (ours[0][2] - theirs[0][2]).abs().max() / theirs[0][2].abs().max()
        row = [size]
        for timings in (theirs, ours):
            row += [statistics.median(t[0] for t in timings), statistics.median(t[1] for t in timings)]
        row += [(row[1] + row[2]) / (row[3] + row[4]), float(grad_gap)]
        rows.append(row)
    return rows


HEADER = ["size", "matrix_exp fwd s", "matrix_exp bwd s", "skew_exp fwd s", "skew_exp bwd s",
          "speedup fwd+bwd", "grad rel. gap"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 576, 1536])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=float, default=0.1, help="spectral radius of the skew generator")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = bench(args.sizes, args.repeats, args.scale, args.device)
    print(f"exp of a skew matrix, forward + backward, on {args.device}, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}")
    print(tabulate(rows, headers=HEADER, tablefmt="github", floatfmt=".3g"))


if __name__ == "__main__":
    main()
