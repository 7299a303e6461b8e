"""``segflow predict``: a registered model over image files and folders, masks (and overlays) out."""

from __future__ import annotations

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

_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm", ".pgm"}
#: Largest image predict will decode (tiles bound the model's memory, this bounds the image's).
MAX_PIXELS = 400_000_000


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


def read(path: Path) -> np.ndarray:
    """An input image as 8-bit (H, W, C), EXIF orientation applied.

    Raises:
        SegflowError: missing, not an image, or unreadable (one line naming the file).
    """
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


def overlay(image: np.ndarray, mask: np.ndarray, classes: int) -> np.ndarray:
    """The image with class colours blended in (background left as it is): (H, W, 3) uint8."""
    rgb = viz.as_rgb(image).astype(np.float32)
    colour = viz.colourize(mask, classes).astype(np.float32)
    alpha = np.where(mask[..., None] > 0, 0.45, 0.0)
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


def run(
    predictor, files: list[Path], out: Path, with_overlay: bool = False, progress: bool = True
) -> tuple[int, list[str]]:
    """Predict every file into ``out/<stem>.png`` (class ids) and, with ``with_overlay``, ``<stem>_overlay.png``.

    Returns:
        (images written, one error line per file that could not be predicted).
    """
    from tqdm import tqdm

    check_targets(files, out, with_overlay)
    out.mkdir(parents=True, exist_ok=True)
    written, errors = 0, []
    bar = tqdm(files, unit="image", disable=not progress, file=sys.stderr)
    for path in bar:
        try:
            image = read(path)
        except SegflowError as error:
            errors.append(str(error))
            bar.write(f"segflow: error: {error}; skipped", file=sys.stderr)
            continue
        mask = predictor.predict(image)
        with atomic_path(out / f"{path.stem}.png") as tmp:
            write_png(tmp, mask)
        if with_overlay:
            with atomic_path(out / f"{path.stem}_overlay.png") as tmp:
                Image.fromarray(overlay(image, mask, len(predictor.card.classes))).save(tmp, format="PNG")
        written += 1
    return written, errors
