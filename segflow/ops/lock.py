"""One pipeline run per project at a time, and a message that says who holds it.

The lock is an ``flock`` on ``.segflow/run.lock`` (:func:`segflow.proc.exclusive`): the kernel releases it
when its process ends, however it ends (a SIGKILL included), so a killed run never leaves the project
locked. The file also says who holds it (pid, command, start time) for the message the next run prints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from segflow.errors import SegflowError
from segflow.proc import Held, exclusive
from segflow.stage import STATE_DIR

LOCK_FILE = STATE_DIR / "run.lock"


class Busy(SegflowError):
    """Another pipeline run holds the project."""


@contextlib.contextmanager
def project_lock(root: Path) -> Iterator[None]:
    """Hold the project's run lock for the block.

    Raises:
        Busy: another run holds it (the message names its process and what to do).
    """
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive(Path(root) / LOCK_FILE))
        except Held as held:
            raise Busy(
                f"{root}: another pipeline run is using this project ({held.holder}); wait for it to finish, "
                f"or stop it (kill {held.pid})"
            ) from None
        yield


def check_free(root: Path) -> None:
    """Fail at once when another run holds the project (before starting a server for nothing).

    Raises:
        Busy: it is held.
    """
    with project_lock(root):
        pass


def clear_stale_dvc_locks(root: Path) -> int:
    """Drop the entries of processes that no longer exist from DVC's ``.dvc/tmp/rwlock``; return how many.

    A stage killed mid-run (Ctrl-C, SIGKILL) leaves its entry there. DVC removes one only when a later
    command needs the same paths, with a warning each time ("had been killed. Auto removed it"), so the
    warnings came back run after run. The run clears them all once, quietly, under DVC's own lock on the
    file, while it holds the project (no segflow stage of this project is running then).
    """
    import psutil
    from dvc.fs import LocalFileSystem
    from dvc.rwlock import _edit_rwlock  # DVC's own editor of the file, under its lock

    tmp_dir = Path(root) / ".dvc" / "tmp"
    if not (tmp_dir / "rwlock").is_file():
        return 0
    dropped = 0
    with contextlib.suppress(Exception), _edit_rwlock(str(tmp_dir), LocalFileSystem(), False) as lock:
        for path, info in list(lock["write"].items()):
            if not psutil.pid_exists(int(info["pid"])):
                del lock["write"][path]
                dropped += 1
        for path, infos in list(lock["read"].items()):
            alive = [info for info in infos if psutil.pid_exists(int(info["pid"]))]
            dropped += len(infos) - len(alive)
            if alive:
                lock["read"][path] = alive
            else:
                del lock["read"][path]
    return dropped
