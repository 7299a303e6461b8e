"""A full disk: telling it from other write errors, and saying which disk filled up and what is free on it."""

from __future__ import annotations

import contextlib
import errno
import io
import os
from collections.abc import Iterator
from pathlib import Path

#: errno values that mean the disk (or the user's quota on it) is full.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = tuple(os.strerror(code) for code in NO_SPACE)  # "No space left on device", "Disk quota exceeded"


def chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, outermost first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def no_space(error: BaseException) -> BaseException | None:
    """The error in ``error``'s chain that says the disk is full (ENOSPC or EDQUOT, or their message in a
    wrapping exception's text), or None."""
    for found in chain(error):
        if isinstance(found, OSError) and found.errno in NO_SPACE:
            return found
    for found in chain(error):
        if any(text in str(found) for text in _NO_SPACE_TEXT):
            return found
    return None


def written_file(error: BaseException) -> Path | None:
    """The file a disk-full ``error`` was writing, when it can be told: the error's own file name, else a file
    open for writing in the innermost frame that had one (``write()`` and ``close()`` errors name none)."""
    for found in reversed(list(chain(error))):  # the first error first: the write that found the disk full
        name = getattr(found, "filename", None)
        if isinstance(name, str) and name:
            return Path(name)
        frames = []
        tb = found.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        for frame in reversed(frames):
            for value in frame.f_locals.values():
                if not isinstance(value, io.IOBase):
                    continue
                with contextlib.suppress(Exception):
                    name = getattr(value, "path", None) or value.name  # fsspec's local files have .path
                    if isinstance(name, str) and any(flag in str(value.mode) for flag in "wax+"):
                        return Path(name)
    return None


def free_space(path: Path) -> tuple[Path, int]:
    """The mount point of the filesystem holding ``path`` (or its nearest existing parent), and the bytes free
    on it for this user (``os.statvfs``)."""
    path = Path(os.path.realpath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path, stats.f_bavail * stats.f_frsize


def disk_full(error: BaseException) -> str:
    """What filled up, for a one-line error: the disk (and file) the write failed on, what is free on it now."""
    full = no_space(error)
    quota = isinstance(full, OSError) and full.errno == errno.EDQUOT
    written = written_file(error)
    holding = written if written is not None else Path.cwd()  # the project, when the file is not known
    mount, free = free_space(holding)
    if written is not None and holding.is_absolute() and holding.is_relative_to(Path.cwd()):
        holding = holding.relative_to(Path.cwd())
    mb = f"{free / 1e6:.0f}" if free >= 10e6 else f"{free / 1e6:.1f}"
    return (
        f"no space left{' (disk quota exceeded)' if quota else ''} on the disk holding {holding} "
        f"({mb} MB free on {mount}): free some space and rerun"
    )
