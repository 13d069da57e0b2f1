"""One trainer per run directory: a lock file holding the host and process id of the run that trains in it.

``RunLock(run_dir).acquire()`` creates ``run_dir/.asla.lock`` exclusively (``O_CREAT | O_EXCL``, atomic on local
file systems and on NFS v3+), writes ``{"host", "pid", "started", "command"}`` into it, and ``release()`` removes
it. A second trainer finds the file and gets a `RunLockedError` naming the holder. A lock left by a process that
died without releasing it (SIGKILL, the OOM killer, a power cut) is stale and taken over when its host is this
host and its process is gone (or is another process that reused the id: the start time recorded in the lock is
compared with the process's own on Linux). A lock from another host cannot be checked from here; its message says
how to remove it once that run is known to be over. A file lock (``fcntl.flock``) would vanish with its process by
itself, but it is not reliable on the network file systems run directories often live on, and it says nothing about
who holds it.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import AslaError

LOCK_NAME = ".asla.lock"


class RunLockedError(AslaError):
    """The run directory is in use by another trainer."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc; None elsewhere or if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after the command name


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pid(holder: dict) -> int:
    try:
        return int(holder.get("pid", -1))
    except (TypeError, ValueError):
        return -1


def _alive(pid: int, started: str | None) -> bool:
    """Whether `pid` on this host is still the process that wrote the lock."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    now = _start_time(pid)
    return started is None or now is None or now == started


class RunLock:
    """The lock of one run directory; also a context manager (acquire on enter, release on exit)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one; RunLockedError if another live trainer holds it."""
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
                f.write("\n")
            self.held = True
            return self
        raise RunLockedError(f"{self.path.parent}: could not take the run lock {self.path} (another trainer keeps "
                             "taking it)")

    def _take_over_if_stale(self) -> None:
        holder = self.holder()
        if holder is None:  # unreadable: being written right now, or left empty by a crash mid-write
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return
            if age < 10:
                time.sleep(0.2)
                return
        elif holder.get("host") != socket.gethostname():
            raise RunLockedError(f"{self.path.parent} is in use by process {holder.get('pid')} on host "
                                 f"{holder.get('host')} (since {holder.get('since')}); if that run is over, delete "
                                 f"{self.path}")
        elif _alive(_pid(holder), holder.get("started")):
            raise RunLockedError(f"{self.path.parent} is in use by process {holder.get('pid')} on this host (since "
                                 f"{holder.get('since')}: {holder.get('command')}); wait for it or use another "
                                 "--run-dir")
        # Stale: its process is gone. Move it aside and look at what was moved: if another trainer took the lock
        # over in the meantime, the moved file is its fresh lock and goes back (os.link never overwrites).
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        moved = _read(aside)
        if moved != holder:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink()

    def holder(self) -> dict | None:
        """The lock file's record, or None if there is none or it cannot be read."""
        return _read(self.path)

    def release(self) -> None:
        """Remove the lock if this process holds it (idempotent)."""
        if self.held:
            self.held = False
            holder = self.holder()
            if holder is None or holder.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
