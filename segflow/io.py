"""Files segflow writes and reads: atomic writes, PNG images and masks, hashes."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from segflow.errors import SegflowError


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it onto ``final`` only on success.

    A crash or kill mid-write leaves a hidden ``.<name>.tmp-<pid>-*`` file or folder
    (ignored by git and DVC, removed by the next write once that process is gone),
    never a half-written ``final`` that looks valid. Works for files and folders.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _prune_siblings(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    # mkdtemp gives a folder; a caller writing a file gets the same unique name, free.
    tmp.rmdir()
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            # Move the old folder aside in one rename, then swap the new one in:
            # a kill in between leaves no `final` (which reads as "not written"),
            # never a half-deleted old one that still looks valid.
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{os.getpid()}-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _prune_siblings(final: Path) -> None:
    """Remove ``.<name>.tmp-<pid>-*`` / ``.old-<pid>-*`` leftovers of processes that were killed mid-write."""
    leftovers = [p for kind in ("tmp", "old") for p in final.parent.glob(f".{glob.escape(final.name)}.{kind}-*-*")]
    for leftover in leftovers:
        pid = leftover.name.rsplit(".", 1)[-1].split("-")[1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Like :func:`atomic_path`, with the temporary folder already created."""
    with atomic_path(final) as tmp:
        tmp.mkdir()
        yield tmp


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_png(path: Path, array: np.ndarray) -> None:
    """Write ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` uint8 as PNG (lossless, so masks stay exact)."""
    if array.dtype != np.uint8:
        raise TypeError(f"write_png wants uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    Image.fromarray(array).save(path, format="PNG")


def write_instances(path: Path, instances: np.ndarray) -> None:
    """Write an (H, W) uint16 instance-id array (0 = background) as a 16-bit grayscale PNG."""
    if instances.dtype != np.uint16 or instances.ndim != 2:
        raise TypeError(f"write_instances wants (H, W) uint16, got {instances.shape} {instances.dtype}")
    Image.fromarray(instances).save(path, format="PNG")


def read_instances(path: Path) -> np.ndarray:
    """Read an instance-id PNG ingest wrote: (H, W) uint16, 0 = background, k = the k-th object."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img)
    except (OSError, ValueError) as error:
        raise SegflowError(f"{path}: cannot read instance mask ({error}); rerun dvc repro ingest") from None
    if array.ndim != 2:
        raise SegflowError(f"{path}: not a one-channel instance mask; rerun dvc repro ingest")
    return array.astype(np.uint16, copy=False)


def read_image(path: Path) -> np.ndarray:
    """Read an image ingest wrote: grayscale stays one channel, anything else is RGB.

    Returns:
        (H, W, 1) or (H, W, 3) uint8.
    """
    try:
        with Image.open(path) as img:
            if img.mode == "L":
                return np.asarray(img)[..., None]
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as error:
        raise SegflowError(f"{path}: cannot read image ({error}); replace or remove the file") from None


def read_mask(path: Path) -> np.ndarray:
    """Read a class-index mask (one channel, values are class ids).

    Returns:
        (H, W) uint8.
    """
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise SegflowError(
                    f"{path}: mask has mode {img.mode}, expected one channel of class ids; "
                    "re-save it as 8-bit grayscale (mode L) whose pixel values are the class ids"
                )
            mask = np.asarray(img)
    except OSError as error:
        raise SegflowError(f"{path}: cannot read mask ({error}); replace or remove the file") from None
    if mask.dtype != np.uint8:
        if mask.max(initial=0) > 255:
            raise SegflowError(
                f"{path}: mask values go up to {mask.max()}, but class ids must be below 255; "
                "re-save it as 8-bit grayscale with one id per class (255 = ignore)"
            )
        mask = mask.astype(np.uint8)
    return mask
