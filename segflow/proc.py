"""Processes: name one by pid and start time (a reused pid is not mistaken for it); hold a file lock that
names its holder.

An ``flock`` is released by the kernel when its process ends, however it ends (a SIGKILL included), so a
killed holder never leaves a lock behind.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path


class Held(Exception):
    """The lock is held by another process; ``holder`` says who (``PID n: command, since t``), ``pid`` its pid."""

    def __init__(self, holder: str, pid: str):
        super().__init__(holder)
        self.holder, self.pid = holder, pid


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"PID {info['pid']}: {info['command']}, since {info['started']}"
    except (OSError, ValueError, KeyError):
        return "a process that did not say who it is"


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block, the file saying who holds it.

    Raises:
        Held: another process holds it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            raise Held(holder, holder.split(":")[0].removeprefix("PID ")) from None
        info = {
            "pid": os.getpid(),
            "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv)) or "python",
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def process_identity(pid: int | None = None) -> str:
    """``pid:start-time``: names one process, not a later one that reuses its pid."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_time(pid)}"


def _start_time(pid: int) -> str:
    try:
        # Field 22 of /proc/<pid>/stat, after the command name (which may hold spaces).
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def is_alive(identity: str) -> bool:
    """Whether the process ``identity`` (from :func:`process_identity`) is still running."""
    pid, _, start = identity.partition(":")
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    if start in ("", "?"):
        return True
    current = _start_time(int(pid))
    return current in ("?", start) and not _is_zombie(int(pid))


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
