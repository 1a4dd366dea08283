"""One run at a time: a lock file per run id, safe across processes and across the hosts of a cluster.

`RunLock(path)` guards `<results_dir>/runs/<run_id>.lock`. The lock file is created atomically
(a fully written temp file hard-linked onto the lock's name, which fails if it exists; O_EXCL where
hard links are not supported): it names its holder as JSON (host, pid, the process's start time, the
Slurm job, since when, a random token) and a daemon thread touches it every HEARTBEAT_S seconds
while the run holds it. No kernel lock is involved, so it works wherever the results directory is
shared (NFS, Lustre, the Slurm nodes of a cluster).

A lock whose holder is gone is stale and is taken over:
- its holder ran on this host and that process no longer exists (its pid is dead, a zombie, or
  reused by a process that started later);
- its holder is the Slurm job this process runs in (a requeued job's previous attempt: Slurm never
  runs two attempts of one job at once);
- its heartbeat is older than STALE_S (a holder on another host that died with its node; its host
  cannot be asked).
Taking over is serialized by a second file (`<lock>.break`, created with O_EXCL), and a lock is only
removed if it still holds the token that was judged stale, so two contenders never both win.

A live holder makes `acquire` raise `RunInProgress` (one line: where, which pid, since when), or,
with wait=True, wait until the holder is gone, then take the lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["HEARTBEAT_S", "STALE_S", "RunInProgress", "RunLock", "holder_is_stale"]

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
# A holder on another host is presumed dead once its heartbeat is this old (10 missed beats).
STALE_S = 300.0
# A `.break` file older than this was left by a process killed while breaking a lock.
BREAK_STALE_S = 30.0
POLL_S = 1.0


class RunInProgress(RuntimeError):
    """The same run holds its lock in another live process (here or on another host)."""

    def __init__(
        self, path: Path, holder: dict[str, Any], age_s: float | None, label: str = "", hint: str = ""
    ) -> None:
        self.path = path
        self.holder = holder
        self.age_s = age_s
        where = f"on {holder.get('host', '?')} (pid {holder.get('pid', '?')}"
        if holder.get("slurm_job"):
            where += f", Slurm job {holder['slurm_job']}"
        where += f", since {holder.get('since', '?')}"
        if age_s is not None:
            where += f", heartbeat {age_s:.0f} s ago"
        self.where = f"{where})"
        text = f"{label} is in progress {self.where}" if label else self.where
        super().__init__(f"{text}; {hint}" if hint else text)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process from /proc, or None without /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[0], int(fields[19])


def process_start(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _pid_alive(pid: int, start: int | None) -> bool:
    """Whether the process that wrote a lock on this host still runs (not dead, a zombie, or a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process exists
    stat = _proc_stat(pid)
    if stat is None:  # no /proc (macOS): trust os.kill; else it has just ended
        return not Path("/proc").is_dir()
    state, started = stat
    return state not in ("Z", "X") and (start is None or started == start)


def slurm_job() -> str | None:
    """The Slurm job this process runs in (an array task's own job id), or None."""
    return os.environ.get("SLURM_JOB_ID")


def holder_is_stale(holder: dict[str, Any], age_s: float, *, host: str | None = None) -> bool:
    """Whether the process described by a lock file (heartbeat `age_s` seconds ago) is gone."""
    host = host or socket.gethostname()
    job = slurm_job()
    if job is not None and holder.get("slurm_job") == job and holder.get("pid") != os.getpid():
        return True  # our own job's previous attempt (requeued)
    if holder.get("host") == host and isinstance(holder.get("pid"), int):
        return not _pid_alive(holder["pid"], holder.get("start"))
    return age_s > STALE_S


class RunLock:
    """The lock of one run; use as a context manager or acquire()/release()."""

    def __init__(self, path: str | Path, *, wait: bool = False, label: str = "", hint: str = "") -> None:
        self.path = Path(path)
        self.wait = wait
        self.label, self.hint = label, hint
        self.token = uuid.uuid4().hex
        self.waited = False  # whether acquire found the run in progress and waited for it
        self.took_over: dict[str, Any] | None = None  # the stale holder it replaced, if any
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # --- the file ------------------------------------------------------------------------------

    def _info(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": process_start(os.getpid()),
            "slurm_job": slurm_job(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "token": self.token,
        }

    def _create(self) -> bool:
        """Create the lock file holding our info; False if it exists."""
        data = json.dumps(self._info()).encode()
        tmp = self.path.with_name(f".{self.path.name}.{self.token}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here: O_EXCL, then write
                pass
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def read(self) -> tuple[dict[str, Any] | None, float | None]:
        """(holder, seconds since its heartbeat) of the lock file; (None, None) if there is none.

        A file that exists but cannot be parsed (written by an O_EXCL fallback that died before
        writing) reads as a holder {} of that age.
        """
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(text)
            if not isinstance(holder, dict):
                holder = {}
        except ValueError:
            holder = {}
        return holder, max(age, 0.0)

    def _break(self, stale: dict[str, Any]) -> None:
        """Remove the lock file if it still holds `stale` (serialized by <lock>.break)."""
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - breaker.stat().st_mtime > BREAK_STALE_S:
                    breaker.unlink(missing_ok=True)
            return
        try:
            current, _ = self.read()
            if current is not None and current.get("token") == stale.get("token"):
                self.path.unlink(missing_ok=True)
                self.took_over = stale
        finally:
            os.close(fd)
            breaker.unlink(missing_ok=True)

    # --- acquire / release ----------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock; RunInProgress if a live process holds it (or, with wait=True, wait for it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        announced = False
        while True:
            if self._create():
                break
            holder, age = self.read()
            if holder is None:
                continue  # released meanwhile
            unreadable_and_old = not holder and age is not None and age > BREAK_STALE_S
            if unreadable_and_old or (holder and holder_is_stale(holder, age or 0.0)):
                log.warning("taking over the stale lock %s (%s)", self.path, _describe(holder, age))
                self._break(holder)
                continue
            if not self.wait:
                raise RunInProgress(self.path, holder, age, self.label, self.hint)
            if not announced:
                log.info("waiting: %s", RunInProgress(self.path, holder, age, self.label or "the same run"))
                announced = True
            self.waited = True
            time.sleep(POLL_S)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lock-heartbeat {self.path.name}", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        warned = False
        while not self._stop.wait(HEARTBEAT_S):
            holder, _ = self.read()
            if holder is None or holder.get("token") != self.token:
                if not warned:
                    log.warning("the lock %s was taken over by %s while this run held it",
                                self.path, _describe(holder or {}, None))
                    warned = True
                continue
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        holder, _ = self.read()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(holder: dict[str, Any], age: float | None) -> str:
    if not holder:
        return "no readable holder"
    return RunInProgress(Path(), holder, age).where
