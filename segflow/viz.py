"""Pictures for people: coloured masks, labelled grids with a class legend."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

from segflow.params import IGNORE_INDEX

_IGNORE_COLOUR = (128, 128, 128)


def palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class id, evenly spaced hues (no class is black: on CamVid class 0 is sky, and
    black reads as "nothing"); alternate classes a little darker so neighbours in the list stay apart.

    Returns:
        (256, 3) uint8, indexable by any mask value; ignored pixels are grey.
    """
    colours = np.zeros((256, 3), dtype=np.uint8)
    for cls in range(num_classes):
        hue = cls / max(num_classes, 1)
        colours[cls] = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.75, 1.0 if cls % 2 == 0 else 0.7)]
    colours[IGNORE_INDEX] = _IGNORE_COLOUR
    return colours


def as_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) uint8 as (H, W, 3), for pictures."""
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def colourize(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class ids to (H, W, 3) uint8 colours."""
    return palette(num_classes)[mask]


def object_edges(instances: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of each object that touch another object or the background."""
    ids = np.asarray(instances)
    edge = np.zeros(ids.shape, dtype=bool)
    vertical, horizontal = ids[:-1] != ids[1:], ids[:, :-1] != ids[:, 1:]
    edge[:-1] |= vertical
    edge[1:] |= vertical
    edge[:, :-1] |= horizontal
    edge[:, 1:] |= horizontal
    return edge & (ids > 0)


def instance_colours(instances: np.ndarray, outlined: bool = True) -> np.ndarray:
    """(H, W) instance ids to (H, W, 3) uint8: each object its own colour (hues a golden angle apart) on dark
    grey; ``outlined``: in white where it meets another object or the background, so touching objects stay
    apart."""
    ids = instances.astype(np.int64)
    hue = (ids * 0.618033988749895) % 1.0
    sector = (hue * 6).astype(np.int64) % 6
    frac = hue * 6 - np.floor(hue * 6)
    v, s = 0.95, 0.75
    low, falling, rising = v * (1 - s), v * (1 - s * frac), v * (1 - s * (1 - frac))
    table = [
        (v, rising, low),
        (falling, v, low),
        (low, v, rising),
        (low, falling, v),
        (rising, low, v),
        (v, low, falling),
    ]
    rgb = np.zeros((*ids.shape, 3), dtype=np.float64)
    for k, channels in enumerate(table):
        where = sector == k
        for c in range(3):
            rgb[..., c][where] = np.broadcast_to(channels[c], ids.shape)[where]
    out = (rgb * 255).round().astype(np.uint8)
    out[ids == 0] = (40, 40, 40)
    if outlined:
        out[object_edges(ids)] = (255, 255, 255)
    return out


def grid(rows: list[list[np.ndarray]], classes: list[str], titles: list[str], scale: int = 2) -> np.ndarray:
    """Tile equally sized RGB panels into a picture with column titles and a legend.

    Args:
        rows: each a list of (H, W, 3) uint8 panels, one per title.
        classes: class names, for the legend.
        titles: one title per column.
        scale: nearest-neighbour upscaling, so small images stay readable.

    Returns:
        (H', W', 3) uint8.
    """
    gap = 4
    height, width = rows[0][0].shape[:2]
    cell_h, cell_w = height * scale, width * scale
    header, legend_h = 16, 18
    entries = [*enumerate(classes), (IGNORE_INDEX, f"ignored ({IGNORE_INDEX})")]
    legend_w = gap + sum(24 + 7 * len(name) for _, name in entries)
    canvas = Image.new(
        "RGB",
        (max(len(titles) * (cell_w + gap) + gap, legend_w), header + len(rows) * (cell_h + gap) + gap + legend_h),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(titles):
        draw.text((gap + col * (cell_w + gap), 2), title, fill=(0, 0, 0))
    for r, panels in enumerate(rows):
        for col, panel in enumerate(panels):
            tile = Image.fromarray(panel).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (gap + col * (cell_w + gap), header + gap + r * (cell_h + gap)))
    colours = palette(len(classes))
    x, y = gap, canvas.height - legend_h + 3
    for cls, name in entries:
        draw.rectangle((x, y, x + 10, y + 10), fill=tuple(int(c) for c in colours[cls]), outline=(0, 0, 0))
        draw.text((x + 14, y), name, fill=(0, 0, 0))
        x += 24 + 7 * len(name)
    return np.asarray(canvas)


def confusion(counts: np.ndarray, classes: list[str], cell: int = 44) -> np.ndarray:
    """A confusion matrix as a picture: rows are the true class, columns the predicted one, each cell
    shaded by its share of the row (its number written in percent), so a rare class reads as clearly as
    a common one. Returns (H, W, 3) uint8."""
    counts = np.asarray(counts, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    label = max(60, 7 * max(len(c) for c in classes) + 10)
    size = len(classes)
    canvas = Image.new("RGB", (label + size * cell + 4, label + size * cell + 4), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), "true \\ predicted", fill="black")
    for j, name in enumerate(classes):  # column heads, then row heads
        draw.text((label + j * cell + 2, label - 14), name[: cell // 7], fill="black")
        draw.text((4, label + j * cell + cell // 2 - 6), name, fill="black")
    for i in range(size):
        for j in range(size):
            share = shares[i, j]
            tone = int(255 - 200 * share)
            fill = (tone, tone, 255) if i == j else (255, tone, tone)
            x, y = label + j * cell, label + i * cell
            draw.rectangle((x, y, x + cell - 2, y + cell - 2), fill=fill)
            draw.text((x + 4, y + cell // 2 - 6), f"{100 * share:.0f}%" if counts[i].sum() else "-", fill="black")
    return np.asarray(canvas)
