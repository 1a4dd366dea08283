"""A stand-in for run.py with the same shape, to test the Slurm launcher without a model.

Calibrates `blocks` blocks one after another, checkpointing each under
<results_dir>/ckpt/<run_id>/ (outside Hydra's output dir, so a requeued job finds them), then writes
<results_dir>/runs/<run_id>.json. Each block's state is a hash chain seeded by `seed`, so the record
of a run resumed from any block equals that of an uninterrupted run. Every start of the run appends
the block it starts at to <results_dir>/attempts/<run_id>.log, which is how tests see a resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from latmix.preemption import slurm_task
from latmix.record import checkpoint_dir, record_path, run_id


def write_json_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, sort_keys=True))
    os.replace(tmp, path)


def calibrate_block(previous_state: str, block: int) -> str:
    return hashlib.sha256(f"{previous_state}:{block}".encode()).hexdigest()


def run(cfg: DictConfig) -> dict:
    rid = run_id(OmegaConf.to_container(cfg, resolve=True))
    results_dir = Path(cfg.paths.results_dir)
    ckpt_dir = checkpoint_dir(results_dir, rid)
    done = sorted(ckpt_dir.glob("block_*.json"))
    states = [json.loads(path.read_text())["state"] for path in done]

    attempts = results_dir / "attempts" / f"{rid}.log"
    attempts.parent.mkdir(parents=True, exist_ok=True)
    with attempts.open("a") as log:
        log.write(f"{len(states)}\n")

    state = states[-1] if states else hashlib.sha256(f"seed:{cfg.seed}".encode()).hexdigest()
    for block in range(len(states), cfg.blocks):
        if block == cfg.fail_at_block:
            raise ValueError(f"injected failure in block {block}")
        state = calibrate_block(state, block)
        time.sleep(cfg.seconds_per_block)  # the work a signal interrupts: lost, then redone
        write_json_atomically(ckpt_dir / f"block_{block:03d}.json", {"state": state})
        states.append(state)

    record = {"run_id": rid, "seed": cfg.seed, "blocks": states}
    write_json_atomically(record_path(results_dir, rid), record)
    return record


@hydra.main(version_base="1.3", config_path=".", config_name="config")
@slurm_task
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
