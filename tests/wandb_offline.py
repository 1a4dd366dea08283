"""Reading back what an offline W&B run wrote (for the tests: wandb ships no reader for its run files).

An offline run's .wandb file is a LevelDB-style log of protobuf records: a 7-byte file header, then
32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type). `read_offline_run` parses it
with wandb's own protobuf definitions.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_FILE_HEADER = 7
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _log_records(data: bytes) -> Iterable[bytes]:
    pos, pending = _FILE_HEADER, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk


def read_offline_run(run_dir: str | Path, wait_for_exit: float = 0.0) -> dict[str, Any]:
    """Read back what an offline run logged: {'summary', 'config', 'group', 'tags', 'name', 'job_type',
    'exit_code' (None until the run finished), 'preempting' (marked preempting), 'artifacts' ({name:
    {'type', 'files'}})}.

    wandb 0.31 ships no reader for its run files, so this parses the .wandb file with wandb's own
    protobuf definitions. Its service process writes the file after `run.finish()` returns (seen here:
    the summary missing, complete a moment later), so a reader of a finished run gives it up to
    wait_for_exit seconds to write the run's exit record.
    """
    deadline = time.monotonic() + wait_for_exit
    logged = _read_once(run_dir)
    while logged["exit_code"] is None and time.monotonic() < deadline:
        time.sleep(0.2)
        logged = _read_once(run_dir)
    return logged


def _read_once(run_dir: str | Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2

    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    out: dict[str, Any] = {"summary": {}, "config": {}, "group": None, "tags": [], "name": None, "job_type": None,
                           "exit_code": None, "preempting": False, "artifacts": {}}
    for raw in _log_records(files[0].read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["group"] = record.run.run_group or None
            out["tags"] = list(record.run.tags)
            out["name"] = record.run.display_name or None
            out["job_type"] = record.run.job_type or None
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
        elif kind == "preempting":
            out["preempting"] = True
        elif kind == "artifact":
            files = sorted(entry.path for entry in record.artifact.manifest.contents)
            out["artifacts"][record.artifact.name] = {"type": record.artifact.type, "files": files}
        elif kind == "summary":
            for item in record.summary.update:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                out["summary"][key] = json.loads(item.value_json)
    return out
