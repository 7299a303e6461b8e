"""``segflow predict``: a registered model over image files and folders, masks (and overlays) out.

Images are held whole, except large PNGs, which are streamed: rows are decoded
a strip at a time (:mod:`segflow.pngstream`), predicted by
:meth:`~segflow.semantic.infer.Predictor.stream` (the same class ids as whole),
and the mask is written row by row, so memory grows with the image's width,
not its area (a whole-slide image predicts in a few hundred MB beyond the
model). ``--overlay`` is streamed along with the mask: each finished strip of
rows is blended with its image rows and written as it comes, so it costs no
more memory than the mask. Images that are not streamed (JPEG, TIFF, interlaced
PNG, ..., or a model with ``augment.eval`` transforms, which see the whole
image) are decoded whole after a check of the memory that needs against the
memory available, which refuses one that would not fit with one line instead
of failing part-way with a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from segflow import viz
from segflow.data import decode
from segflow.data.checks import Problem
from segflow.errors import SegflowError
from segflow.io import atomic_path, write_png
from segflow.progress import logged

log = logging.getLogger(__name__)
_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm", ".pgm"}
#: Largest image predict will decode whole (tiles bound the model's memory, this bounds the image's).
MAX_PIXELS = 400_000_000
#: Largest PNG predict streams: a sanity bound (50000 x 50000), far beyond what decodes whole.
STREAM_MAX_PIXELS = 2_500_000_000
#: PNGs with more pixels than this are streamed (smaller ones decode whole: as fast, and the same ids).
STREAM_ABOVE = 2048 * 2048
_FIX = "convert it to a non-interlaced PNG, which segflow streams, or split it into smaller images"


def inputs(paths: list[Path], out: Path | None = None) -> Iterator[Path]:
    """Files named, and image files under folders named (sorted, hidden files left out).

    Args:
        out: the output folder: left out of the folders walked, so an ``--out`` inside an input folder
            does not feed the masks of one run to the next as images.
    """
    skip = Path(out).resolve() if out is not None else None
    for path in paths:
        if path.is_dir():
            yield from sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in _EXTENSIONS
                and not p.name.startswith(".")
                and not (skip is not None and p.resolve().is_relative_to(skip))
            )
        else:
            yield path


def _read_number(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # "max" (no limit), or no such file


def _cgroup_room() -> int | None:
    """The memory this process's cgroups still allow: each limit less its usage (page cache that can be
    dropped, ``inactive_file``, not counted), the least over the cgroup and its parents; None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    room = None
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers == "":  # cgroup v2
            roots, files = [Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")], ("memory.max", "memory.current")
            cache = "inactive_file"
        elif "memory" in controllers.split(","):
            roots, files = [Path("/sys/fs/cgroup/memory")], ("memory.limit_in_bytes", "memory.usage_in_bytes")
            cache = "total_inactive_file"
        else:
            continue
        for root in roots:
            folder = root / group.lstrip("/")
            while folder.is_relative_to(root):
                limit, usage = _read_number(folder / files[0]), _read_number(folder / files[1])
                if limit is not None and usage is not None and limit < 1 << 60:
                    try:
                        stat = (folder / "memory.stat").read_text().split()
                    except OSError:
                        stat = []
                    counts = dict(zip(stat[::2], stat[1::2], strict=False))
                    free = limit - usage + int(counts.get(cache, 0))
                    room = free if room is None else min(room, free)
                if folder == root:
                    break
                folder = folder.parent
    return room


def available_memory() -> tuple[int, str]:
    """The memory this process can still take, and where the figure comes from.

    The least of MemAvailable (/proc/meminfo), the cgroup's limit less its usage, and the address-space
    limit (``ulimit -v``) less the process's size: whichever runs out first ends a decode part-way.
    """
    found: list[tuple[int, str]] = []
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    with contextlib.suppress(OSError, ValueError):
        room = _cgroup_room()
        if room is not None:
            found.append((room, "the cgroup's memory limit"))
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        with contextlib.suppress(OSError, ValueError):
            status = Path("/proc/self/status").read_text()
            size = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmSize:"))
            found.append((limit - size, "the address-space limit (ulimit -v)"))
    if not found:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "free memory"
    return min(found)


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def check_fits(path: Path, width: int, height: int, how: str, need: int, available: int | None, fix: str) -> None:
    """Refuse an image whose prediction needs more memory than is available, before any of it is taken.

    Args:
        how: how it is predicted, in words ("whole (it is a JPEG file)").
        available: bytes, or None for :func:`available_memory` (a given figure stands in for it in tests).

    Raises:
        SegflowError: one line naming the file, its size, the need, the memory available and the fix.
    """
    source = "given"
    if available is None:
        available, source = available_memory()
    if need > available:
        raise SegflowError(
            f"{path}: {width}x{height} ({width * height:,} pixels) needs about {_gib(need)} to predict {how}, "
            f"and {_gib(max(available, 0))} is available ({source}); {fix}"
        )


def _whole_need(path: Path, predictor) -> tuple[int, int, str, int] | None:
    """An image's (width, height, format, bytes to decode and predict it whole), from its header; None if
    Pillow cannot open it (then decoding says why, as it always has)."""
    try:
        with decode._no_pillow_pixel_limit(), Image.open(path) as img:
            width, height, kind, bands = img.width, img.height, img.format or "image", len(img.getbands())
    except Exception:  # not an image, damaged: read() gives the one-line reason
        return None
    # Pillow holds a decoded 8-bit pixel in 1 or 4 bytes, the conversion to 8-bit channels another 4 at
    # most, and the array 1 or 3; then prediction's own arrays (Predictor.whole_bytes), the array still held.
    decoding = width * height * (2 * (1 if bands == 1 else 4) + 3)
    predicting = width * height * 3 + (predictor.whole_bytes(height, width) if predictor is not None else 0)
    return width, height, kind, max(decoding, predicting)


def read(
    path: Path, predictor=None, available: int | None = None, why: str | None = None, fix: str = _FIX
) -> np.ndarray:
    """An input image as 8-bit (H, W, C), EXIF orientation applied.

    Args:
        predictor: with it, the memory that decoding and predicting the image whole take is checked first
            (:func:`check_fits`), so a too-large image is one line, not numpy's ArrayMemoryError part-way.
        available: bytes of memory to check against instead of :func:`available_memory`'s.
        why: why the image is decoded whole, for the refusals ("it is an interlaced PNG"); None: its
            format ("it is a JPEG file"); "": nothing said.
        fix: what the refusals suggest.

    Raises:
        SegflowError: missing, not an image, unreadable, too large (one line naming the file).
    """
    need = _whole_need(path, predictor)
    if need is not None:
        width, height, kind, size = need
        if why is None:
            why = f"it is {'an' if kind[0] in 'AEIOU' else 'a'} {kind} file"
        because = f" ({why})" if why else ""
        if width * height > MAX_PIXELS:
            raise SegflowError(
                f"{path}: {width}x{height} ({width * height:,} pixels) is above the {MAX_PIXELS:,} pixels that "
                f"predict decodes whole{because}; {fix}"
            )
        if predictor is not None:
            check_fits(path, width, height, "whole" + because, size, available, fix)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SegflowError(f"{path}: cannot read it ({error.strerror}); check the path") from None
    try:
        image, _ = decode.open_file(data, str(path), MAX_PIXELS)
        return decode.image_array(image, str(path))
    except Problem as problem:
        if problem.rule == "not_an_image":
            raise SegflowError(f"{path}: not an image file") from None
        if problem.rule == "unreadable":
            raise SegflowError(f"{path}: cannot be decoded ({problem.details['reason']})") from None
        raise SegflowError(problem.line()) from None


def overlay(image: np.ndarray, mask: np.ndarray, classes: int, background: int | None = None) -> np.ndarray:
    """The image with class colours blended in, the ``background`` class (an index; None: none is) left as
    it is: (H, W, 3) uint8."""
    rgb = viz.as_rgb(image).astype(np.float32)
    colour = viz.colourize(mask, classes).astype(np.float32)
    alpha = (
        np.where(mask[..., None] != background, 0.45, 0.0)
        if background is not None
        else np.full((*mask.shape, 1), 0.45)
    )
    return (rgb * (1 - alpha) + colour * alpha).round().astype(np.uint8)


def check_targets(files: list[Path], out: Path, with_overlay: bool = False) -> None:
    """Refuse inputs whose masks would overwrite each other or an input.

    Raises:
        SegflowError: two inputs share a stem, or an output would replace an input file.
    """
    seen: dict[str, Path] = {}
    inputs = {path.resolve() for path in files}
    for path in files:
        if path.stem in seen:
            raise SegflowError(
                f"{path} and {seen[path.stem]} would both be written to {out / (path.stem + '.png')}; "
                "predict them into separate --out folders or rename one"
            )
        seen[path.stem] = path
        names = [f"{path.stem}.png", *([f"{path.stem}_overlay.png"] if with_overlay else [])]
        for name in names:
            if (out / name).resolve() in inputs:
                raise SegflowError(f"{out / name}: is an input image; choose an --out folder that holds no inputs")


def _whole_only(predictor, info) -> tuple[str | None, str] | None:
    """What :func:`read` should say the image is and suggest, when it cannot be streamed; None when it can."""
    if not predictor.streams:
        return "the model's augment.eval transforms see whole images", "split it into smaller images"
    if info is None:
        return None, _FIX  # not a PNG: read() names the format
    if info.whole_only:
        return f"it is {info.whole_only}", _FIX
    return None


def _predict_streamed(
    predictor, info, mask_path: Path, overlay_path: Path | None, available: int | None, background: int | None = None
) -> None:
    """Predict a PNG a strip of rows at a time, writing the mask (and overlay) as rows finish.

    Both files are written inside :func:`atomic_path`: an error or a kill part-way leaves no mask (or overlay)
    that looks whole.
    """
    from segflow import pngstream

    path = info.path
    if info.pixels > STREAM_MAX_PIXELS:
        raise SegflowError(
            f"{path}: is {info.width}x{info.height} ({info.pixels:,} pixels), above the {STREAM_MAX_PIXELS:,} "
            "that predict streams; split it into smaller images"
        )
    need = predictor.stream_bytes(info.height, info.width, info.channels) + 4 * pngstream.STRIP_BYTES
    how = "in strips of its width"
    check_fits(path, info.width, info.height, how, need, available, "split it into narrower images")
    classes = len(predictor.card.classes)
    with contextlib.ExitStack() as stack:
        mask = stack.enter_context(
            pngstream.PngWriter(stack.enter_context(atomic_path(mask_path)), info.width, info.height)
        )
        shown = None
        if overlay_path is not None:
            tmp = stack.enter_context(atomic_path(overlay_path))
            shown = stack.enter_context(pngstream.PngWriter(tmp, info.width, info.height, 3))
        for rows, ids in predictor.stream(pngstream.strips(info), info.height, info.width):
            mask.write(ids)
            if shown is not None:
                shown.write(overlay(rows, ids, classes, background))


def run(
    predictor,
    files: list[Path],
    out: Path,
    with_overlay: bool = False,
    progress: bool = True,
    stream: bool | None = None,
    available: int | None = None,
    background: str | None = None,
) -> tuple[int, list[str]]:
    """Predict every file into ``out/<stem>.png`` (class ids) and, with ``with_overlay``, ``<stem>_overlay.png``.

    Args:
        stream: stream PNGs (True), decode every image whole as before (False), or stream PNGs above
            :data:`STREAM_ABOVE` pixels (None). The class ids are the same either way.
        available: bytes of memory to check needs against, instead of :func:`available_memory`'s (tests).
        background: the class the overlay leaves uncoloured (params' ``background``), if the model has it.

    Returns:
        (images written, one error line per file that could not be predicted).
    """
    from tqdm import tqdm

    from segflow import pngstream

    check_targets(files, out, with_overlay)
    out.mkdir(parents=True, exist_ok=True)
    classes = predictor.card.classes
    plain = classes.index(background) if background in classes else None
    written, errors = 0, []
    bar = tqdm(files, unit="image", disable=not progress, file=sys.stderr)
    # No terminal for the bar (a log file, a worker): a line every 30 s instead.
    for path in bar if progress else logged(files, len(files), "predict", log):
        mask_path = out / f"{path.stem}.png"
        overlay_path = out / f"{path.stem}_overlay.png" if with_overlay else None
        info = pngstream.scan(path) if stream is not False else None
        whole = ("", _FIX) if stream is False else _whole_only(predictor, info)
        try:
            if whole is None and (stream or info.pixels > STREAM_ABOVE):
                _predict_streamed(predictor, info, mask_path, overlay_path, available, plain)
                written += 1
                continue
            why, fix = whole or ("", _FIX)
            image = read(path, predictor, available, why, fix)
        except SegflowError as error:
            errors.append(str(error))
            bar.write(f"segflow: error: {error}; skipped", file=sys.stderr)
            continue
        mask = predictor.predict(image)
        with atomic_path(mask_path) as tmp:
            write_png(tmp, mask)
        if overlay_path is not None:
            with atomic_path(overlay_path) as tmp:
                Image.fromarray(overlay(image, mask, len(classes), plain)).save(tmp, format="PNG")
        written += 1
    return written, errors
