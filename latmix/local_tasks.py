"""The evaluation data shipped with latmix: held-out text files and lm-eval tasks built from them.

The task yaml files in data/tasks/ name their jsonl relative to their own folder, because the repo can
live anywhere; lm-eval wants absolute `data_files` paths, so `materialize_local_tasks` writes copies
with absolute paths and returns the folder to hand to
`lm_eval.tasks.TaskManager(include_path=..., include_defaults=False)`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import yaml

from latmix.files import atomic_write

LOCAL_TASKS: tuple[str, ...] = ("tiny_lambada", "tiny_hellaswag", "tiny_wordorder")
TEXT_NAMES: tuple[str, ...] = ("calibration", "heldout", "ood")


def data_dir() -> Path:
    """The repo's data/ folder (text, tasks, MANIFEST.json, NOTICE)."""
    return Path(__file__).resolve().parents[1] / "data"


def text_path(name: str) -> Path:
    """data/text/<name>.txt: calibration (training-split text), heldout (WikiText-2's role) or ood."""
    if name not in TEXT_NAMES:
        raise ValueError(f"unknown local text {name!r}; choose one of {', '.join(TEXT_NAMES)}")
    return data_dir() / "text" / f"{name}.txt"


def default_cache_dir() -> Path:
    """Per-checkout cache folder: two clones of the repo must not overwrite each other's absolute paths."""
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    checkout = hashlib.sha256(str(data_dir()).encode()).hexdigest()[:12]
    return cache_home / "latmix" / "local_tasks" / checkout


def _absolute_task_config(yaml_path: Path) -> dict:
    config = yaml.safe_load(yaml_path.read_text())
    data_files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {
        split: str((yaml_path.parent / rel).resolve()) for split, rel in data_files.items()
    }
    return config


def materialize_local_tasks(dest: Path | None = None) -> Path:
    """Write the local task yaml files with absolute data paths into dest; return it as lm-eval's include_path."""
    dest = Path(dest) if dest is not None else default_cache_dir()
    for task in LOCAL_TASKS:
        source = data_dir() / "tasks" / task / f"{task}.yaml"
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: rebuild the tasks with scripts/build_tasks.py")
        config = _absolute_task_config(source)
        # Several processes (pytest workers, sweep jobs) may materialize into the same cache at once.
        text = yaml.safe_dump(config, sort_keys=False)
        atomic_write(dest / task / f"{task}.yaml", lambda f, text=text: f.write(text.encode()))
    return dest
