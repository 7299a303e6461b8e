"""PNG files read and written a strip of rows at a time, so an image need not fit in memory.

Reading: the file's chunks are scanned first (IDAT data is skipped, not read),
then IDAT is inflated incrementally with ``zlib.decompressobj`` and handed on
in strips of rows. Pillow's C code does the per-row unfiltering (Python would
take minutes per image for the Paeth and Average filters) on a small in-memory
PNG per strip: the previous row, already reconstructed, under filter type 0,
then the strip's rows still filtered, recompressed at zlib level 0 (a copy).
That PNG is declared as 8-bit gray, gray+alpha, RGB or RGBA of the same bytes
per pixel, which Pillow returns byte for byte, so every colour type and depth
is unfiltered the same way; PNG filters work byte lane by byte lane (a byte
only ever refers to the bytes ``bpp`` before it and above it), so 16-bit
colour (6 or 8 bytes per pixel) is unfiltered as two images of its even and
odd lanes. The rows, now unfiltered, are then decoded as a second small PNG
with the file's own header, palette and transparency, under filter type 0, and
converted by :func:`segflow.data.decode.image_array`: each strip gets exactly
the pixels that Pillow and segflow give for the whole file. Interlaced PNGs,
animated ones and those whose EXIF turns them are not streamed (their rows are
not the picture's rows); :func:`scan` says so and the caller decodes them whole.

Writing: :class:`PngWriter` writes 8-bit gray or RGB rows as they come (filter
type Up, which makes the repeated rows of a class mask nearly free, then
zlib), with the signature, IHDR, IDAT chunks and IEND that a reader checks.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np
from PIL import Image

from segflow.errors import SegflowError

SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Bytes of filtered rows inflated and decoded at a time (a strip is copied a few times on its way).
STRIP_BYTES = 1 << 20
_ORIENTATION = 0x0112  # the EXIF tag
#: channels per colour type (0 gray, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA), and the depths it allows.
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
#: An 8-bit colour type of each byte count per pixel: Pillow gives these back byte for byte.
_AS_BYTES = {1: 0, 2: 4, 3: 2, 4: 6}
#: Chunks that a strip's PNG needs (palette, transparency), or that may hold EXIF orientation.
_KEPT = {b"PLTE", b"tRNS"}
_METADATA = {b"eXIf", b"tEXt", b"zTXt", b"iTXt"}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return b"".join([struct.pack(">I", len(data)), kind, data, struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))])


def _ihdr(width: int, height: int, depth: int, colour: int) -> bytes:
    return _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))


@dataclass
class PngInfo:
    """What :func:`scan` found in a PNG file."""

    path: Path
    width: int
    height: int
    depth: int
    colour: int
    #: why the file cannot be streamed (interlaced, animated, turned by EXIF), or None
    whole_only: str | None
    #: PLTE and tRNS, as stored (a strip's PNG carries them)
    kept: list[bytes] = field(default_factory=list)
    #: (file offset of the data, length) of each IDAT chunk, in order
    idat: list[tuple[int, int]] = field(default_factory=list)

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def row_bytes(self) -> int:
        return (self.width * _CHANNELS[self.colour] * self.depth + 7) // 8

    @property
    def pixel_bytes(self) -> int:
        """Bytes per pixel as the filters see it (at least one)."""
        return max(1, _CHANNELS[self.colour] * self.depth // 8)

    @property
    def channels(self) -> int:
        """Channels of the decoded rows: one for gray, three otherwise (as image_array gives them)."""
        return 1 if self.colour == 0 or (self.colour == 4 and self.depth == 8) else 3


def scan(path: Path) -> PngInfo | None:
    """The layout of a PNG file, read from its chunks (IDAT's data is skipped, not read).

    Returns:
        None when the file is not a well-formed PNG (a damaged chunk, an unknown colour type, no IEND):
        whole-file decoding then reports it as it always has.
    """
    try:
        with open(path, "rb") as file:
            if file.read(8) != SIGNATURE:
                return None
            chunks: list[tuple[bytes, bytes]] = []
            idat: list[tuple[int, int]] = []
            while True:
                head = file.read(8)
                if len(head) < 8:
                    return None
                length, kind = struct.unpack(">I4s", head)
                if kind == b"IDAT":
                    idat.append((file.tell(), length))
                    file.seek(length + 4, io.SEEK_CUR)
                    continue
                data, crc = file.read(length), file.read(4)
                if len(data) < length or len(crc) < 4 or struct.unpack(">I", crc)[0] != zlib.crc32(kind + data):
                    return None
                chunks.append((kind, data))
                if kind == b"IEND":
                    break
    except OSError:
        return None
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13 or not idat:
        return None
    width, height, depth, colour, method, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if colour not in _DEPTHS or depth not in _DEPTHS[colour] or method or filtering or interlace > 1:
        return None
    if not width or not height or (colour == 3 and not any(kind == b"PLTE" for kind, _ in chunks)):
        return None
    whole_only = None
    if interlace:
        whole_only = "an interlaced PNG"
    elif any(kind in (b"acTL", b"fcTL") for kind, _ in chunks):
        whole_only = "an animated PNG"
    elif any(kind in _METADATA for kind, _ in chunks) and _turned(chunks):
        whole_only = "a PNG turned by its EXIF orientation"
    kept = [_chunk(kind, data) for kind, data in chunks if kind in _KEPT]
    return PngInfo(Path(path), width, height, depth, colour, whole_only, kept, idat)


def _turned(chunks: list[tuple[bytes, bytes]]) -> bool:
    """Whether Pillow reads an EXIF orientation other than upright from the file's metadata chunks.

    Asked of Pillow itself (eXIf, or EXIF and XMP in text chunks), on a 1x1 PNG carrying those chunks.
    """
    meta = b"".join(_chunk(kind, data) for kind, data in chunks if kind in _METADATA)
    tiny = SIGNATURE + _ihdr(1, 1, 8, 0) + meta + _chunk(b"IDAT", zlib.compress(b"\0\0")) + _chunk(b"IEND", b"")
    try:
        with Image.open(io.BytesIO(tiny)) as img:
            img.load()
            return img.getexif().get(_ORIENTATION, 1) not in (None, 1)
    except Exception:  # any doubt: decode it whole, as before
        return True


def _idat(file, info: PngInfo, piece: int = 1 << 20) -> Iterator[bytes]:
    """The compressed image data, in pieces of at most ``piece`` bytes (a chunk may be of any size)."""
    for offset, length in info.idat:
        file.seek(offset)
        crc = zlib.crc32(b"IDAT")
        for start in range(0, length, piece):
            data = file.read(min(piece, length - start))
            if len(data) < min(piece, length - start):
                raise SegflowError(f"{info.path}: cannot be decoded (truncated PNG file)")
            crc = zlib.crc32(data, crc)
            yield data
        stored = file.read(4)
        if len(stored) < 4:
            raise SegflowError(f"{info.path}: cannot be decoded (truncated PNG file)")
        if struct.unpack(">I", stored)[0] != crc:
            raise SegflowError(f"{info.path}: cannot be decoded (broken PNG file: an IDAT chunk fails its CRC)")


def _png(width: int, rows: np.ndarray, depth: int, colour: int, kept: list[bytes]) -> Image.Image:
    """A strip's in-memory PNG, decoded by Pillow: ``rows`` are (n, 1 + row bytes), filter byte first."""
    data = zlib.compress(rows, 0)
    png = [SIGNATURE, _ihdr(width, len(rows), depth, colour), *kept]
    png += [struct.pack(">I", len(data)), b"IDAT", data, struct.pack(">I", zlib.crc32(data, zlib.crc32(b"IDAT")))]
    img = Image.open(io.BytesIO(b"".join([*png, _chunk(b"IEND", b"")])))
    img.load()
    return img


def _as_bytes(kinds: np.ndarray, data: np.ndarray, lanes: int) -> np.ndarray:
    """Filtered rows of ``lanes`` (1-4) bytes per pixel, unfiltered by Pillow as 8-bit channels."""
    img = _png(data.shape[1] // lanes, np.concatenate([kinds, data], axis=1), 8, _AS_BYTES[lanes], [])
    return np.asarray(img).reshape(len(data), -1)


def _unfilter(filtered: np.ndarray, previous: np.ndarray | None, lanes: int) -> np.ndarray:
    """Rows of bytes with their filters undone (by Pillow), for ``lanes`` bytes per pixel.

    Args:
        filtered: (n, 1 + row bytes), each row's filter type first.
        previous: the row above, reconstructed (row bytes,), or None for the image's first row.

    Returns:
        (n, row bytes) uint8.
    """
    if previous is not None:
        above = np.zeros((1, filtered.shape[1]), dtype=np.uint8)  # filter type 0: the row as it is
        above[0, 1:] = previous
        filtered = np.concatenate([above, filtered])
    skip = 0 if previous is None else 1
    kinds, data = filtered[:, :1], filtered[:, 1:]
    if lanes in _AS_BYTES:
        return _as_bytes(kinds, data, lanes)[skip:]
    # 16-bit colour (6 or 8 bytes): lanes are independent under every filter, so even and odd bytes go apart.
    pixels = data.reshape(len(data), -1, lanes)
    out = np.empty_like(pixels)
    for first in (0, 1):
        part = pixels[:, :, first::2]
        out[:, :, first::2] = _as_bytes(kinds, part.reshape(len(data), -1), lanes // 2).reshape(part.shape)
    return out.reshape(len(data), -1)[skip:]


def strips(info: PngInfo, strip_bytes: int = STRIP_BYTES) -> Iterator[np.ndarray]:
    """The image's rows, top to bottom, as :func:`segflow.data.decode.image_array` gives the whole image.

    Yields:
        (n, W, C) uint8 strips, C one for gray and three otherwise, together ``info.height`` rows.

    Raises:
        SegflowError: the file is truncated or damaged (one line naming it).
    """
    from segflow.data import decode
    from segflow.data.checks import Problem

    if info.whole_only:
        raise ValueError(f"{info.path} is {info.whole_only}: decode it whole")
    stride = info.row_bytes + 1
    per_strip = max(1, strip_bytes // stride)
    inflate = zlib.decompressobj()
    previous: np.ndarray | None = None
    with open(info.path, "rb") as file:
        chunks = _idat(file, info)
        for top in range(0, info.height, per_strip):
            want = min(per_strip, info.height - top) * stride
            parts, have = [], 0
            while have < want:
                if inflate.unconsumed_tail:
                    data = inflate.unconsumed_tail
                else:
                    data = next(chunks, None)
                    if data is None or inflate.eof:
                        raise SegflowError(
                            f"{info.path}: cannot be decoded (truncated PNG file: image data ends early)"
                        )
                try:
                    got = inflate.decompress(data, want - have)
                except zlib.error as error:
                    raise SegflowError(f"{info.path}: cannot be decoded (broken PNG file: {error})") from None
                parts.append(got)
                have += len(got)
            filtered = np.frombuffer(b"".join(parts), dtype=np.uint8).reshape(-1, stride)
            del parts
            bad = np.flatnonzero(filtered[:, 0] > 4)
            if len(bad):
                raise SegflowError(
                    f"{info.path}: cannot be decoded (broken PNG file: filter type {filtered[bad[0], 0]} "
                    f"in row {top + bad[0]})"
                )
            raw = _unfilter(filtered, previous, info.pixel_bytes)
            previous = raw[-1].copy()
            rows = np.concatenate([np.zeros((len(raw), 1), np.uint8), raw], axis=1)
            img = _png(info.width, rows, info.depth, info.colour, info.kept)
            try:
                yield decode.image_array(img, str(info.path))
            except Problem as problem:
                raise SegflowError(problem.line()) from None


class PngWriter:
    """A PNG written row by row: 8-bit gray (class ids) or RGB, filter type Up, zlib at ``level``.

    Use it as a context manager; leaving it early (an error) closes the file without IEND, so what is
    there is no valid PNG (write into :func:`segflow.io.atomic_path`, which removes it).
    """

    def __init__(self, path: Path, width: int, height: int, channels: int = 1, level: int = 6):
        if channels not in (1, 3):
            raise ValueError(f"PngWriter writes gray or RGB, not {channels} channels")
        self.path, self.width, self.height, self.channels = Path(path), width, height, channels
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close() or __exit__)
        self._file.write(SIGNATURE + _ihdr(width, height, 8, 0 if channels == 1 else 2))
        self._deflate = zlib.compressobj(level)
        self._previous = np.zeros(width * channels, dtype=np.uint8)
        self._out: list[bytes] = []
        self._size = 0
        self.rows = 0

    def write(self, rows: np.ndarray) -> None:
        """Append rows: (n, W) or (n, W, channels) uint8."""
        rows = np.asarray(rows)
        if rows.dtype != np.uint8 or rows.reshape(len(rows), -1).shape[1] != self.width * self.channels:
            raise ValueError(f"rows of {rows.shape} {rows.dtype} for a {self.width}-wide {self.channels}-channel PNG")
        if self.rows + len(rows) > self.height:
            raise ValueError(f"more than the {self.height} rows declared")
        flat = rows.reshape(len(rows), -1)
        filtered = np.empty((len(rows), flat.shape[1] + 1), dtype=np.uint8)
        filtered[:, 0] = 2  # Up: each byte minus the one above it
        filtered[:, 1:] = flat
        filtered[0, 1:] -= self._previous
        filtered[1:, 1:] -= flat[:-1]
        self._previous = flat[-1].copy()
        self.rows += len(rows)
        self._emit(self._deflate.compress(filtered.tobytes()))

    def _emit(self, data: bytes, last: bool = False) -> None:
        if data:
            self._out.append(data)
            self._size += len(data)
        if self._size >= 1 << 20 or (last and self._size):
            self._file.write(_chunk(b"IDAT", b"".join(self._out)))
            self._out, self._size = [], 0

    def close(self) -> None:
        """Finish the file: the rest of the data and IEND.

        Raises:
            ValueError: fewer rows were written than declared (the file is closed, unfinished).
        """
        if self._file.closed:
            return
        try:
            if self.rows != self.height:
                raise ValueError(f"{self.rows} rows written of the {self.height} declared")
            self._emit(self._deflate.flush(), last=True)
            self._file.write(_chunk(b"IEND", b""))
        finally:
            self._file.close()

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None):
        if kind is None:
            self.close()
        else:
            self._file.close()
