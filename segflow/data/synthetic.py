"""The built-in demo dataset: seeded multi-class scenes a model has to learn.

Each object class has its own shape and surface texture (ellipses with smooth
shading, rotated boxes with stripes, triangles with speckle, ...), and a colour
that leans towards the class but overlaps the others, so neither colour nor a
single pixel gives the class away. Objects vary in size, aspect and angle,
overlap each other, sit on a shaded, noisy background and appear with unequal
frequency (class imbalance on purpose).

Pure functions of a seed and params: image ``i`` depends only on ``(seed, i)``,
so it is the same whatever ``num_images`` is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

# One (shape, texture, colour tendency) per object class, in class-id order.
_KINDS = (
    ("ellipse", "smooth", (0.85, 0.35, 0.30)),
    ("box", "stripes", (0.30, 0.75, 0.35)),
    ("triangle", "speckle", (0.30, 0.40, 0.85)),
    ("ring", "smooth", (0.85, 0.80, 0.30)),
    ("cross", "stripes", (0.75, 0.35, 0.80)),
    ("diamond", "speckle", (0.30, 0.80, 0.80)),
)
MAX_OBJECT_CLASSES = len(_KINDS)
# Default frequency per object class: the last classes are rarer.
_DEFAULT_WEIGHTS = (0.45, 0.33, 0.22, 0.3, 0.2, 0.15)
# Object radius as a fraction of the image side, per class (triangles run smaller).
_RADIUS = ((0.08, 0.20), (0.08, 0.18), (0.10, 0.18), (0.10, 0.18), (0.09, 0.16), (0.07, 0.14))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    grid = rng.random((cells, cells), dtype=np.float32)
    img = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img)


def _region(kind: str, u: np.ndarray, v: np.ndarray, radius: float, aspect: float) -> np.ndarray:
    """Boolean region of a shape in its own rotated frame (u, v centred on the object)."""
    if kind == "ellipse":
        return (u / radius) ** 2 + (v / (radius * aspect)) ** 2 <= 1.0
    if kind == "box":
        return (np.abs(u) <= radius) & (np.abs(v) <= radius * aspect)
    if kind == "triangle":
        # Equilateral triangle inscribed in `radius`: three half-planes.
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            angle = 2 * np.pi * k / 3
            inside &= u * np.cos(angle) + v * np.sin(angle) <= radius / 2
        return inside
    if kind == "ring":
        dist = np.hypot(u, v)
        return (dist <= radius) & (dist >= radius * 0.55)
    if kind == "cross":
        arm = radius * 0.35
        return ((np.abs(u) <= radius) & (np.abs(v) <= arm)) | ((np.abs(v) <= radius) & (np.abs(u) <= arm))
    if kind == "diamond":
        return np.abs(u) / radius + np.abs(v) / (radius * aspect) <= 1.0
    raise ValueError(f"unknown shape {kind!r}")


def _texture(rng: np.random.Generator, kind: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Surface pattern in [0, 1] over the whole image (only the object's region is used)."""
    if kind == "smooth":
        # Radial shading: bright centre, darker rim.
        return np.clip(1.0 - 0.6 * np.hypot(u, v) / radius, 0.0, 1.0)
    if kind == "stripes":
        period = rng.uniform(3.0, 6.0)
        return 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * u / period))
    if kind == "speckle":
        return (rng.random(u.shape) < 0.35).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def make_scene(
    rng: np.random.Generator,
    size: int,
    num_object_classes: int,
    class_weights: np.ndarray,
    min_objects: int,
    max_objects: int,
    noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene: image (size, size, 3) uint8 and mask (size, size) uint8 of class ids (see :func:`render`)."""
    image, mask, _, _ = render(rng, size, num_object_classes, class_weights, min_objects, max_objects, noise)
    return image, mask


def render(
    rng: np.random.Generator,
    size: int,
    num_object_classes: int,
    class_weights: np.ndarray,
    min_objects: int,
    max_objects: int,
    noise: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Render one scene, its class mask and its objects.

    Args:
        rng: the scene's own generator.
        size: side of the square image in pixels.
        num_object_classes: object classes 1..num_object_classes are drawn (0 is background).
        class_weights: (num_object_classes,) probabilities of each object class.
        min_objects, max_objects: object count range (inclusive).
        noise: standard deviation of additive Gaussian noise, on a 0-1 scale.

    Returns:
        image (size, size, 3) uint8, mask (size, size) uint8 of class ids, instances (size, size) uint16
        (0 = background, k = the k-th object drawn, as much of it as later objects leave visible: touching
        and overlapping objects stay apart) and the class id (1-based) of each object, in drawing order.
        An object drawn over completely keeps its number but has no pixel.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.uniform(0.25, 0.6, size=3).astype(np.float32)
    shade = 0.35 * (_smooth_noise(rng, size, 4) - 0.5)
    image = np.clip(base[None, None, :] + shade[..., None], 0, 1)
    mask = np.zeros((size, size), dtype=np.uint8)
    instances = np.zeros((size, size), dtype=np.uint16)
    drawn: list[int] = []

    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        cls = int(rng.choice(num_object_classes, p=class_weights))
        shape, texture, tint = _KINDS[cls]
        lo, hi = _RADIUS[cls]
        radius = rng.uniform(lo, hi) * size
        aspect = rng.uniform(0.55, 1.0)
        cx, cy = rng.uniform(0.1 * size, 0.9 * size, size=2)
        theta = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        region = _region(shape, u, v, radius, aspect)
        if not region.any():
            continue
        colour = np.clip(np.asarray(tint) + rng.normal(0, 0.12, size=3), 0.05, 0.95)
        pattern = _texture(rng, texture, u, v, radius)
        contrast = rng.uniform(0.35, 0.7)
        fill = colour[None, None, :] * (1 - contrast + contrast * pattern[..., None])
        image[region] = fill[region]
        mask[region] = cls + 1  # later objects occlude earlier ones, in the mask too
        drawn.append(cls + 1)
        instances[region] = len(drawn)

    image = image * rng.uniform(0.75, 1.15)  # global exposure
    image = image + rng.normal(0, noise, size=image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask, instances, drawn


def _weights(num_classes: int, class_weights: list[float] | None) -> np.ndarray:
    num_object_classes = num_classes - 1
    if not 1 <= num_object_classes <= MAX_OBJECT_CLASSES:
        raise ValueError(
            f"the synthetic source draws 1 to {MAX_OBJECT_CLASSES} object classes, "
            f"but classes lists {num_object_classes}"
        )
    weights = np.asarray(class_weights or _DEFAULT_WEIGHTS[:num_object_classes], dtype=np.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"class_weights must be non-negative and not all zero, got {list(weights)}")
    return weights / weights.sum()


@dataclass(frozen=True)
class SyntheticItem:
    """One demo scene to render: a pure function of the seed and its index (cheap to send to a worker)."""

    id: str
    index: int
    seed: int
    num_classes: int
    size: int
    min_objects: int
    max_objects: int
    noise: float
    class_weights: tuple[float, ...]
    split: None = None

    @property
    def image_name(self) -> str:
        return f"synthetic:{self.id}"

    mask_name = image_name

    def read(self, *_) -> tuple[np.ndarray, np.ndarray, dict, dict]:
        """Render the scene: image (H, W, 3) uint8, mask (H, W) uint8 class ids, provenance, no stored files."""
        rng = np.random.default_rng([self.seed, self.index])
        image, mask = make_scene(
            rng,
            self.size,
            self.num_classes - 1,
            np.asarray(self.class_weights),
            self.min_objects,
            self.max_objects,
            self.noise,
        )
        provenance = {"source_image": self.image_name, "source_mask": self.mask_name}
        return image, mask, provenance | {"sha256_image": "", "sha256_mask": ""}, {}  # no source files


def items(
    seed: int,
    num_images: int,
    num_classes: int,
    size: int,
    min_objects: int,
    max_objects: int,
    noise: float,
    class_weights: list[float] | None = None,
) -> list[SyntheticItem]:
    """The demo dataset's scenes, as work items for the ingest stage.

    Args:
        num_classes: classes including background (so ``num_classes - 1`` object classes).
        class_weights: relative frequency per object class; defaults favour the first classes.

    Raises:
        ValueError: more object classes than the generator has kinds of object.
    """
    weights = tuple(float(w) for w in _weights(num_classes, class_weights))
    return [
        SyntheticItem(f"synth_{i:05d}", i, seed, num_classes, size, min_objects, max_objects, noise, weights)
        for i in range(num_images)
    ]


def generate(
    seed: int,
    num_images: int,
    num_classes: int,
    size: int,
    min_objects: int,
    max_objects: int,
    noise: float,
    class_weights: list[float] | None = None,
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield ``(sample_id, image, mask)`` for the demo dataset (see :func:`items`)."""
    for item in items(seed, num_images, num_classes, size, min_objects, max_objects, noise, class_weights):
        image, mask, _, _ = item.read()
        yield item.id, image, mask


def renumber(instances: np.ndarray, classes: list[int], min_area: int) -> tuple[np.ndarray, list[dict]]:
    """Objects with at least ``min_area`` visible pixels, numbered 1..N in drawing order; the rest cleared.

    Args:
        instances: (H, W) uint16 of object numbers (k = ``classes[k - 1]``).
        classes: the 0-based object category of each number.

    Returns:
        (H, W) uint16 instance ids and the table ``[{"instance", "class", "crowd"}]``.
    """
    areas = np.bincount(instances.ravel(), minlength=len(classes) + 1)
    lookup = np.zeros(len(classes) + 1, dtype=np.uint16)
    table = []
    for number, cls in enumerate(classes, start=1):
        if areas[number] >= min_area:
            table.append({"instance": len(table) + 1, "class": int(cls), "crowd": False})
            lookup[number] = len(table)
    return lookup[instances], table


@dataclass(frozen=True)
class SyntheticInstanceItem(SyntheticItem):
    """One demo scene with its objects (task: instance): the same pictures as the semantic demo."""

    def read(self, *_) -> tuple[np.ndarray, np.ndarray, list[dict], dict]:
        """Render the scene: image (H, W, 3) uint8, instances (H, W) uint16, their table, provenance."""
        rng = np.random.default_rng([self.seed, self.index])
        image, _, numbers, drawn = render(
            rng,
            self.size,
            self.num_classes - 1,
            np.asarray(self.class_weights),
            self.min_objects,
            self.max_objects,
            self.noise,
        )
        instances, table = renumber(numbers, [cls - 1 for cls in drawn], min_area=2)
        provenance = {"source_image": self.image_name, "source_mask": self.mask_name}
        return image, instances, table, provenance | {"sha256_image": "", "sha256_mask": ""}


def instance_items(
    seed: int,
    num_images: int,
    num_categories: int,
    size: int,
    min_objects: int,
    max_objects: int,
    noise: float,
    class_weights: list[float] | None = None,
) -> list[SyntheticInstanceItem]:
    """The demo's scenes as objects of ``num_categories`` categories (no background class among them)."""
    return [
        SyntheticInstanceItem(**vars(item))
        for item in items(seed, num_images, num_categories + 1, size, min_objects, max_objects, noise, class_weights)
    ]
