"""Move records to the run id their config has now, after a change to what a run's identity is.

    python scripts/rekey_records.py                  # results/runs, prints what it would move
    python scripts/rekey_records.py --apply          # moves them
    python scripts/rekey_records.py --results-dir DIR --apply

A run's id hashes its config (latmix.record.run_id over latmix.config.identity_config). Since
2026-12-02 the local files a config names are spelled one way in it (relative to the project root
when inside it), so a record written earlier with an absolute or ./ path is stored under an id that
the same command no longer computes: rerunning it would run it again, and the tables would put it in
an evaluation setting of its own. This rewrites each such record's `run_id` and `config` and moves it
to its new id; nothing else in it changes. What else the results folder keeps under the run's id
moves with it (latmix.record.run_files): the learned maps (`transforms/<id>.safetensors`), an export
(`export/<id>/`, its manifest then naming the new id) and a calibration checkpoint (`ckpt/<id>/`). A
record whose new id is taken by a different record is left where it is and named. Hydra's output
folders and W&B runs keep the old id. Imports no torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from latmix import record
from latmix.config import identity_config
from latmix.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]


def rekeyed(rec: dict) -> dict:
    """The record as the current identity keys it (the same dict when nothing changes)."""
    config = identity_config(OmegaConf.create(rec["config"]))
    rid = record.run_id(config)
    return rec if rid == rec["run_id"] and config == rec["config"] else {**rec, "run_id": rid, "config": config}


def rekey(results_dir: Path, apply: bool) -> list[tuple[str, str, str]]:
    """(old id, new id, what happened) for every record under results_dir/runs that a new id keys."""
    moves = []
    for path in sorted((results_dir / "runs").glob("*.json")):
        rec = record.read_record(path)
        new = rekeyed(rec)
        if new is rec:
            continue
        target = record.record_path(results_dir, new["run_id"])
        if target.exists() and target != path and record.read_record(target) != new:
            moves.append((rec["run_id"], new["run_id"], "kept: a different record has the new id"))
            continue
        if apply:
            record.write_record(target, new)
            if target != path:
                path.unlink()
                move_companions(results_dir, rec["run_id"], new["run_id"])
        moves.append((rec["run_id"], new["run_id"], "moved" if apply else "would move"))
    return moves


def move_companions(results_dir: Path, old: str, new: str) -> None:
    """Moves the run's files kept under its old id (record.run_files) to its new one; an existing
    target is left alone. A moved export's manifest names the new id."""
    for source, target in zip(record.run_files(results_dir, old), record.run_files(results_dir, new), strict=True):
        if source.exists() and not target.exists():
            source.rename(target)
    manifest = record.export_dir(results_dir, new) / record.EXPORT_MANIFEST
    if manifest.is_file():
        content = json.loads(manifest.read_text())
        if content.get("run_id") == old:
            text = json.dumps({**content, "run_id": new}, indent=2, sort_keys=True)
            atomic_write(manifest, lambda f: f.write(text.encode()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=ROOT / "results")
    parser.add_argument("--apply", action="store_true", help="move the records (without it: only list them)")
    args = parser.parse_args()
    moves = rekey(args.results_dir, args.apply)
    for old, new, what in moves:
        print(f"{old} -> {new}  {what}")
    print(f"{len(moves)} record(s) keyed by an earlier identity" if moves else "every record has its current id")


if __name__ == "__main__":
    main()
