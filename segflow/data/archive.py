"""Unpack a dataset archive (.zip, .tar, .tar.gz, .tgz) safely into a scratch folder.

The archive itself is only read. A member that would land outside the
extraction folder (an absolute path, ``..``, a link pointing out, a device
file: "zip slip") is never written; it is returned as a :class:`Problem`.
Sizes are checked before anything is written: a member that inflates far more
than images compress (a "zip bomb"), or members that would not fit on the disk,
stop the extraction with one line.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from segflow.data.checks import Problem
from segflow.errors import SegflowError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
#: A member may inflate at most this many times its compressed size (PNG/JPEG/TIFF data stays far below),
#: once it is larger than :data:`SMALL` (tiny text files compress well and harm nothing).
MAX_RATIO = 100
SMALL = 16 << 20


def _check_sizes(label: str, members: list[tuple[str, int, int | None]], dest: Path) -> None:
    """Refuse before extracting: a member inflating beyond :data:`MAX_RATIO`, or more bytes than ``dest``'s disk
    has free. ``members``: (name, declared size, compressed size or None)."""
    for name, size, packed in members:
        if packed is not None and size > SMALL and size > MAX_RATIO * max(packed, 1):
            raise SegflowError(
                f"{label}:{name}: inflates {size / max(packed, 1):.0f}x ({packed / 2**20:.1f} MiB to "
                f"{size / 2**30:.2f} GiB), far beyond what image files do; refusing to extract it (a zip bomb?): "
                "check where the archive came from"
            )
    total = sum(size for name, size, _ in members if name != "(all members)")
    free = shutil.disk_usage(dest).free
    if total > free:
        raise SegflowError(
            f"{label}: unpacks to {total / 2**30:.2f} GiB but {dest} has {free / 2**30:.2f} GiB free; "
            "free some space, or unpack it yourself and point ingest.path at the folder"
        )


def is_archive(path: Path) -> bool:
    """Whether ``path`` names a file of a supported archive type."""
    return Path(path).is_file() and Path(path).name.lower().endswith(ARCHIVE_SUFFIXES)


def _unsafe_zip_member(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member must not be extracted, or None when it is safe."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(name).parts:
        return "'..' in its path"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link"
    return None


def _extract_zip(archive: Path, dest: Path, label: str) -> list[Problem]:
    problems = []
    try:
        with zipfile.ZipFile(archive) as zf:
            _check_sizes(label, [(i.filename, i.file_size, i.compress_size) for i in zf.infolist()], dest)
            for info in zf.infolist():
                reason = _unsafe_zip_member(info)
                if reason:
                    problems.append(Problem("archive_escape", f"{label}:{info.filename}", reason=reason))
                    continue
                if info.is_dir():
                    continue
                target = dest / PurePosixPath(info.filename.replace("\\", "/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise SegflowError(f"{label}: cannot read the zip archive ({error}); replace it with a good copy") from None
    return problems


def _extract_tar(archive: Path, dest: Path, label: str) -> list[Problem]:
    problems = []
    try:
        with tarfile.open(archive, mode="r:*") as tf:
            members = tf.getmembers()  # headers only (a compressed tar is inflated once, not written)
            sizes = [(m.name, m.size, None) for m in members if m.isfile()]
            if not archive.name.lower().endswith(".tar"):  # compressed as a whole: its ratio is the archive's
                sizes.append(("(all members)", sum(size for _, size, _ in sizes), archive.stat().st_size))
            _check_sizes(label, sizes, dest)
            for member in members:
                try:
                    # The standard library's "data" filter refuses exactly the members we must not write.
                    tarfile.data_filter(member, str(dest))
                except tarfile.FilterError as error:
                    reason = type(error).__name__.removesuffix("Error").replace("Outside", "outside ")
                    problems.append(Problem("archive_escape", f"{label}:{member.name}", reason=reason.lower()))
                    continue
                if member.isfile():
                    tf.extract(member, dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise SegflowError(f"{label}: cannot read the tar archive ({error}); replace it with a good copy") from None
    return problems


def extract(archive: Path, dest: Path, label: str | None = None) -> list[Problem]:
    """Unpack ``archive`` into ``dest`` (which must exist), refusing unsafe members.

    Args:
        label: how messages name the archive (default: its path).

    Returns:
        The members that were refused.

    Raises:
        SegflowError: the archive is damaged or not of its kind.
    """
    archive, dest = Path(archive), Path(dest)
    label = label or str(archive)
    if archive.name.lower().endswith(".zip"):
        return _extract_zip(archive, dest, label)
    return _extract_tar(archive, dest, label)
