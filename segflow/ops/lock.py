"""One pipeline run per project at a time, and a message that says who holds it.

The lock is an ``flock`` on ``.segflow/run.lock``: the kernel releases it when
its process ends, however it ends (a SIGKILL included), so a killed run never
leaves the project locked. The file also says who holds it (pid, command,
start time) for the message the next run prints.
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

from segflow.errors import SegflowError
from segflow.stage import STATE_DIR

LOCK_FILE = STATE_DIR / "run.lock"


class Busy(SegflowError):
    """Another pipeline run holds the project."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"PID {info['pid']}: {info['command']}, since {info['started']}"
    except (OSError, ValueError, KeyError):
        return "a process that did not say who it is"


@contextlib.contextmanager
def project_lock(root: Path) -> Iterator[None]:
    """Hold the project's run lock for the block.

    Raises:
        Busy: another run holds it (the message names its process and what to do).
    """
    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            pid = holder.split(":")[0].removeprefix("PID ")
            raise Busy(
                f"{root}: another pipeline run is using this project ({holder}); wait for it to finish, "
                f"or stop it (kill {pid})"
            ) from None
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


def check_free(root: Path) -> None:
    """Fail at once when another run holds the project (before starting a server for nothing).

    Raises:
        Busy: it is held.
    """
    with project_lock(root):
        pass
