"""Regenerate the paper tables and figures from every result record.

    python scripts/make_tables.py                                   # results/runs -> results/tables
    python scripts/make_tables.py --results-dir /scratch/latmix --out /scratch/latmix/tables
    python scripts/make_tables.py --run-id 0123456789ab             # per-layer figure of this run

Writes results.{md,tex,csv}: one table per model and evaluation setting, full precision first, mean
± std over seeds, delta vs full precision, best per format in bold; with a reference CSV,
vs_published.{md,csv}; and figures/*.{png,pdf}: metrics per method with seed error bars, and the
per-layer bound vs measured error. A malformed record is reported on stderr by path and skipped; a
row with runs made on uncommitted code is marked † and the runs are named on stderr. Imports no torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from latmix.report import regenerate

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="holds runs/<run_id>.json")
    parser.add_argument("--out", type=Path, default=None, help="default: <results-dir>/tables")
    parser.add_argument("--reference", type=Path, default=ROOT / "results" / "reference" / "published.csv")
    parser.add_argument("--any-format", action="store_true",
                        help="compare with published rows of any number format (e.g. our MXFP4 vs their INT4)")
    parser.add_argument("--run-id", action="append", default=None,
                        help="draw the per-layer bound vs error of this run (repeatable); default: the first "
                             "seed of each configuration with per-layer data, up to --max-layer-figures")
    parser.add_argument("--max-layer-figures", type=int, default=6)
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = args.out or args.results_dir / "tables"
    paths, messages = regenerate(
        args.results_dir, out, args.reference, match_format=not args.any_format, figures=not args.no_figures,
        run_ids=args.run_id, max_layer_figures=args.max_layer_figures,
    )
    for message in messages:
        print(message, file=sys.stderr)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)


if __name__ == "__main__":
    main()
