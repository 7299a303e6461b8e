"""Pictures for people: coloured masks, labelled grids with a class legend."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

from segflow.params import IGNORE_INDEX

_IGNORE_COLOUR = (128, 128, 128)


def palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class id: black background, evenly spaced hues after it.

    Returns:
        (256, 3) uint8, indexable by any mask value; ignored pixels are grey.
    """
    colours = np.zeros((256, 3), dtype=np.uint8)
    for cls in range(1, num_classes):
        hue = (cls - 1) / max(num_classes - 1, 1)
        colours[cls] = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.75, 1.0)]
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
    canvas = Image.new(
        "RGB",
        (len(titles) * (cell_w + gap) + gap, header + len(rows) * (cell_h + gap) + gap + legend_h),
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
    for cls, name in enumerate(classes):
        draw.rectangle((x, y, x + 10, y + 10), fill=tuple(int(c) for c in colours[cls]), outline=(0, 0, 0))
        draw.text((x + 14, y), name, fill=(0, 0, 0))
        x += 24 + 7 * len(name)
    return np.asarray(canvas)
