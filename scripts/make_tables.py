"""Regenerate the paper tables from every result record.

    python scripts/make_tables.py                                   # results/runs -> results/tables
    python scripts/make_tables.py --results-dir /scratch/latmix --out /scratch/latmix/tables

Writes results.{md,tex,csv} and, with a reference CSV, vs_published.{md,csv}; a malformed record is
reported on stderr by path and skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from latmix.tables import regenerate

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="holds runs/<run_id>.json")
    parser.add_argument("--out", type=Path, default=None, help="default: <results-dir>/tables")
    parser.add_argument("--reference", type=Path, default=ROOT / "results" / "reference" / "published.csv")
    parser.add_argument("--any-format", action="store_true",
                        help="compare with published rows of any number format (e.g. our MXFP4 vs their INT4)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = args.out or args.results_dir / "tables"
    paths, messages = regenerate(args.results_dir, out, args.reference, match_format=not args.any_format)
    for message in messages:
        print(message, file=sys.stderr)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)


if __name__ == "__main__":
    main()
