"""A dev split of the calibration text: choose settings on it, never on the evaluation texts.

    python scripts/dev_split.py                       # results/dev_split/{calib_train,calib_dev}.txt
    python scripts/dev_split.py --dev-fraction 0.15 --source data/text/calibration.txt --out DIR

Writes the first (1 - fraction) of the source's lines as the training part and the rest as the dev
part (whole lines, so no document is cut mid-line), and prints the overrides that calibrate on the
one and measure perplexity on the other:

    calib.path=.../calib_train.txt eval.ppl_datasets=[.../calib_dev.txt] eval.tasks=[]

The README's block-size choice used the default split (5558 / 981 of the shipped text's 6539 lines).
Imports no torch.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def split_lines(text: str, dev_fraction: float) -> tuple[str, str]:
    """(training part, dev part): the last ceil(fraction * lines) lines are the dev part."""
    if not 0.0 < dev_fraction < 1.0:
        raise SystemExit(f"--dev-fraction must lie strictly between 0 and 1 (got {dev_fraction})")
    lines = text.splitlines(keepends=True)
    n_train = len(lines) - math.ceil(dev_fraction * len(lines))
    if n_train < 1 or n_train == len(lines):
        raise SystemExit(f"a text of {len(lines)} lines cannot be split at a dev fraction of {dev_fraction}")
    return "".join(lines[:n_train]), "".join(lines[n_train:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=ROOT / "data" / "text" / "calibration.txt")
    parser.add_argument("--dev-fraction", type=float, default=0.15)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "dev_split")
    args = parser.parse_args()
    if not args.source.is_file():
        raise SystemExit(f"no text at {args.source}: pass --source PATH to a UTF-8 text file")
    train, dev = split_lines(args.source.read_text(encoding="utf-8"), args.dev_fraction)
    args.out.mkdir(parents=True, exist_ok=True)
    train_path, dev_path = (args.out / "calib_train.txt").resolve(), (args.out / "calib_dev.txt").resolve()
    train_path.write_text(train, encoding="utf-8")
    dev_path.write_text(dev, encoding="utf-8")
    print(f"{train.count(chr(10))} lines -> {train_path}\n{dev.count(chr(10))} lines -> {dev_path}")
    print(f"calib.path={train_path} eval.ppl_datasets=[{dev_path}] eval.tasks=[]")


if __name__ == "__main__":
    main()
