"""Process liveness: name a process by pid and start time, so a reused pid is not mistaken for it."""

from __future__ import annotations

import os
from pathlib import Path


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
