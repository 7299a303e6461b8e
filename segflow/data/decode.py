"""Decode a user's image and mask files into arrays, and masks into class ids.

Images come as PNG, JPEG, TIFF, BMP (anything Pillow reads) in modes 1, L,
LA, P, RGB, RGBA, CMYK or 16-bit grayscale; EXIF orientation is applied;
alpha is dropped; 16-bit images are scaled to 8-bit (``ingest.scale_16bit``).
Masks come as one channel (L, P read by index, 16-bit) or as colour-coded RGB
with a palette. Every failure is a :class:`~segflow.data.checks.Problem` naming the file.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segflow.data.checks import Problem
from segflow.params import IGNORE_INDEX

_GRAY = {"1", "L", "LA"}
_COLOUR = {"RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
_WIDE = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_ORIENTATION = 0x0112  # the EXIF tag


@contextlib.contextmanager
def _no_pillow_pixel_limit() -> Iterator[None]:
    """Let ``ingest.max_pixels`` decide, not Pillow's global default (checked before decoding)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _reason(error: BaseException) -> str:
    return " ".join(str(error).split())[:160] or type(error).__name__


def open_file(data: bytes, name: str, max_pixels: int) -> tuple[Image.Image, bool]:
    """Decode one image file held in memory, after checking its size from the header.

    Returns:
        The image, upright (EXIF orientation applied), and whether ``data`` already is that
        image as an 8-bit grayscale or RGB PNG (so it can be copied rather than encoded again).

    Raises:
        Problem: not an image, damaged or truncated, a multi-page file, or above ``max_pixels``.
    """
    with _no_pillow_pixel_limit():
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise Problem("not_an_image", name, reason="no image format recognised") from None
        except (OSError, ValueError, SyntaxError, EOFError) as error:
            raise Problem("unreadable", name, reason=_reason(error)) from None
        width, height = img.size
        if width * height > max_pixels:
            raise Problem("too_many_pixels", name, width=width, height=height, pixels=width * height, limit=max_pixels)
        if getattr(img, "n_frames", 1) > 1:
            raise Problem(
                "unsupported_mode", name, mode=f"{img.n_frames}-page", fix="save each page as its own image file"
            )
        try:
            img.load()
            upright = img.getexif().get(_ORIENTATION, 1) in (None, 1)
            as_stored = img.format == "PNG" and img.mode in ("L", "RGB") and upright
            return (img if upright else ImageOps.exif_transpose(img)), as_stored
        except (OSError, ValueError, SyntaxError, EOFError) as error:
            raise Problem("unreadable", name, reason=_reason(error)) from None


def _to_8bit(values: np.ndarray, name: str, scale_16bit: str) -> np.ndarray:
    """16-bit grayscale to 8-bit: the full 0-65535 range, or each image's own min-max."""
    values = values.astype(np.int64)
    low, high = int(values.min(initial=0)), int(values.max(initial=0))
    if low < 0 or high > 65535:
        raise Problem("unsupported_mode", name, mode="32-bit integer", fix="save it as 8- or 16-bit grayscale")
    if scale_16bit == "per_image":
        span = max(high - low, 1)
        return ((values - low) * 255 + span // 2) // span
    return (values * 255 + 32767) // 65535


def image_array(img: Image.Image, name: str, scale_16bit: str = "full_range") -> np.ndarray:
    """The picture as 8-bit channels: grayscale stays one channel, anything else becomes RGB.

    Returns:
        (H, W, 1) or (H, W, 3) uint8.

    Raises:
        Problem: a mode ingest does not read (floating point).
    """
    if img.mode in _GRAY:
        return np.asarray(img.convert("L"))[..., None]
    if img.mode in _WIDE:
        return _to_8bit(np.asarray(img), name, scale_16bit).astype(np.uint8)[..., None]
    if img.mode in _COLOUR:
        return np.asarray(img.convert("RGB"))
    raise Problem("unsupported_mode", name, mode=img.mode, fix="save it as 8-bit (or 16-bit) grayscale or RGB")


def mask_array(img: Image.Image, name: str, colour: bool = False) -> np.ndarray:
    """The mask's stored values: palette indices for P, values for L / 16-bit, colours for RGB.

    Args:
        colour: read colours (a palette maps them to classes), whatever the file's mode.

    Returns:
        (H, W) integer values, or (H, W, 3) uint8 colours.
    """
    if colour:
        return np.asarray(img.convert("RGB"))
    if img.mode in ("P", "L"):
        return np.asarray(img)
    if img.mode in ("1", "LA"):
        return np.asarray(img.convert("L"))
    if img.mode in _WIDE:
        return np.asarray(img).astype(np.int32)
    if img.mode in ("RGB", "RGBA", "RGBX"):
        rgb = np.asarray(img.convert("RGB"))
        # Grayscale saved as RGB (equal channels) is still one channel of values.
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
            return rgb[..., 0]
        return rgb
    raise Problem("unsupported_mode", name, mode=img.mode, fix="save the mask as 8-bit grayscale of class ids")


@dataclass(frozen=True)
class MaskEncoding:
    """How stored mask values become class ids (see ``ingest.mask_values``, ``palette``, ``ignore_values``)."""

    num_classes: int
    #: raw value -> class id; None: values are class ids.
    values: dict[int, int] | None = None
    #: (r, g, b) -> class id, for colour-coded masks.
    palette: dict[tuple[int, int, int], int] | None = None
    #: raw values (or colours) that mean "no class".
    ignore: frozenset = field(default_factory=frozenset)

    def _lookup(self, value) -> int | None:
        if value in self.ignore:
            return IGNORE_INDEX
        if self.palette is not None:
            return self.palette.get(value)
        if self.values is not None:
            return self.values.get(value)
        return value if 0 <= value < self.num_classes else None

    def _unmapped(self, value, pixels: int, all_values: list, name: str) -> Problem:
        if self.palette is not None:
            shown = list(value)
            expected = "a colour neither in ingest.palette nor in ingest.ignore_values"
            fix = "add the colour to ingest.palette or ingest.ignore_values"
        elif self.values is not None:
            shown, expected = value, "which ingest.mask_values does not map nor ingest.ignore_values list"
            fix = "add it to one of them"
        else:
            shown = value
            expected = f"which is not a class id (0-{self.num_classes - 1}) nor listed in ingest.ignore_values"
            fix = "map raw values to class ids with ingest.mask_values, or list the value in ingest.ignore_values"
            if set(all_values) <= {0, 255}:
                fix = "a 0/255 binary mask? set ingest.mask_values: {0: 0, 255: 1} (or whichever way round)"
        return Problem("bad_mask_value", name, value=shown, pixels=pixels, expected=expected, fix=fix)

    def encode(self, raw: np.ndarray, name: str) -> np.ndarray:
        """Stored values to class ids (``IGNORE_INDEX`` where ignored).

        Args:
            raw: (H, W) integer values or (H, W, 3) uint8 colours, from :func:`mask_array`.

        Returns:
            (H, W) uint8 class ids.

        Raises:
            Problem: a value that maps to no class, or colours without a palette.
        """
        if raw.ndim == 3:
            if self.palette is None:
                raise Problem(
                    "unsupported_mode",
                    name,
                    mode="colour (RGB) mask",
                    fix="set ingest.palette: {class: [r, g, b]}, or save it as one channel of class ids",
                )
            keys = (raw[..., 0].astype(np.int32) << 16) | (raw[..., 1].astype(np.int32) << 8) | raw[..., 2]
            decode = lambda k: (int(k) >> 16, (int(k) >> 8) & 255, int(k) & 255)  # noqa: E731
        else:
            if self.palette is not None:
                raise Problem(
                    "unsupported_mode", name, mode="one-channel mask", fix="ingest.palette expects RGB colour masks"
                )
            keys, decode = raw, int
        if keys.dtype == np.uint8:
            # The common case, without a sort: a 256-entry table indexed by the values themselves.
            counts = np.bincount(keys.ravel(), minlength=256)
            values = np.flatnonzero(counts)
            index, counts = keys, counts[values]
        else:
            values, index, counts = np.unique(keys, return_inverse=True, return_counts=True)
            index = index.reshape(keys.shape)
        originals = [decode(v) for v in values]
        lut = np.zeros(256 if keys.dtype == np.uint8 else len(values), dtype=np.uint8)
        for i, value in enumerate(originals):
            cls = self._lookup(value)
            if cls is None:
                raise self._unmapped(value, int(counts[i]), originals, name)
            lut[values[i] if keys.dtype == np.uint8 else i] = cls
        return lut[index]
