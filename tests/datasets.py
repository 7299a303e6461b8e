"""Seeded generators of small user datasets on disk, in the layouts and encodings ingest reads.

Every image has a mask drawn from it (a bright blob is class 1), so a pair
that ingest writes can be checked against what was generated.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image


def scene(seed: int, index: int, size: tuple[int, int] = (40, 32), classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A grayscale image and its class-id mask; classes are horizontal bands of blobs.

    Returns:
        image (H, W) uint8, mask (H, W) uint8 with ids in [0, classes).
    """
    width, height = size
    rng = np.random.default_rng([seed, index])
    image = rng.integers(0, 60, (height, width), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    for cls in range(1, classes):
        y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
        mask[y : y + 8, x : x + 8] = cls
        image[y : y + 8, x : x + 8] = 80 + 50 * cls
    return image, mask


def save(path: Path, array: np.ndarray, mode: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, **kwargs)
    return path


def paired(
    root: Path,
    n: int = 6,
    seed: int = 0,
    *,
    images_dir: str = "images",
    masks_dir: str = "masks",
    mask_suffix: str = "",
    mask_encode=lambda mask: mask,
    image_encode=lambda image: image,
    ext: str = ".png",
    size: tuple[int, int] = (40, 32),
    classes: int = 2,
    prefix: str = "img",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/images/<id><ext>`` and ``root/masks/<id><mask_suffix>.png``; returns {id: (image, mask ids)}."""
    made = {}
    for i in range(n):
        sample_id = f"{prefix}_{i:03d}"
        image, mask = scene(seed, i, size, classes)
        save(root / images_dir / f"{sample_id}{ext}", image_encode(image))
        save(root / masks_dir / f"{sample_id}{mask_suffix}.png", mask_encode(mask))
        made[sample_id] = (image, mask)
    return made


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (links not followed), and each entry's mode: to prove nothing changed."""
    hashes = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                hashes[rel] = f"link:{os.readlink(path)}"
            elif path.is_file():
                hashes[rel] = hashlib.sha256(path.read_bytes()).hexdigest() + f":{path.stat().st_mode:o}"
            else:
                hashes[rel] = f"dir:{path.stat().st_mode:o}"
    return hashes
