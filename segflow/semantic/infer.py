"""Inference on images of any size: the one code path ``evaluate`` scores and ``segflow predict`` ships.

A :class:`Predictor` wraps a saved model (PyTorch from safetensors, or its
ONNX export) with the preprocessing its card describes: channels converted to
the model's, pixels scaled to 0-1 and normalised, the image padded at the
bottom/right to a multiple of the model's stride by reflecting its last rows
and columns (as training's validation pads; zeros would show the model a dark
border it never saw in training, and on CamVid made the bottom rows "car"),
the padded pixels cropped off the result. Images that fit in ``tile_size`` go through
in one pass; larger ones in overlapping tiles, so the model's memory is
bounded by the tile. The image's own arrays are not: :meth:`Predictor.logits`
holds them whole (about 60 bytes a pixel), :meth:`Predictor.stream` does not.

Near a tile's inner edge the network sees its zero padding instead of the
image, so a tile's logits there are not the whole image's: for the demo's
Unet/resnet18 (depth 4, stride 16) they differ by about a logit up to 32 px
from the edge and by a few hundredths from 64 px on. Each pixel is therefore
taken from the tile in which it lies most centrally: neighbouring tiles meet
in the middle of their overlap, with a linear crossover over its middle
quarter (:func:`_axis_weights`). A tile's logits count only at least about
``3/8 * overlap`` from its inner edges (the image's own borders are seen as
whole-image prediction sees them, and weigh fully), so a model whose edge
effects reach less than that gives exactly the whole-image logits, and a
larger overlap buys agreement for models that reach further.

:meth:`Predictor.stream` gives the same class ids for an image that need not
fit in memory: its rows come in strips, tiles are cut from the few rows they
cover, and blended logits are kept only for rows that tiles still touch
(about ``tile_size + step`` rows: memory grows with the width, not the area).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from segflow.errors import SegflowError
from segflow.semantic.card import ModelCard

#: A model as a function: (N, C, H, W) float32 to logits (N, K, H, W) float32.
Forward = Callable[[np.ndarray], np.ndarray]


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """An 8-bit image with the model's channel count.

    Args:
        image: (H, W) or (H, W, C) uint8; C is 1, 3 or 4 (alpha is dropped).

    Returns:
        (H, W, channels) uint8; colour to gray by ITU-R 601 luma, gray to colour by repetition.
    """
    if image.ndim == 2:
        image = image[..., None]
    image = image[..., :3]
    if image.shape[2] == channels:
        return image
    if channels == 3:
        return np.repeat(image[..., :1], 3, axis=2)
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]


def padded_index(size: int, padded: int) -> np.ndarray:
    """For each position of an axis padded from ``size`` to ``padded``, the image position it shows: itself,
    then the last ones reflected without repeating the edge (numpy's ``reflect``, OpenCV's
    ``BORDER_REFLECT_101``, which validation's padding uses); an axis of one pixel repeats it."""
    return np.pad(np.arange(size), (0, padded - size), mode="reflect" if size > 1 else "edge")


def _axis_starts(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step))
    return [*starts, length - tile]


def _axis_weights(starts: list[int], size: int, overlap: int) -> list[np.ndarray]:
    """Blend weights along one axis, one array of ``size`` per tile start.

    Consecutive tiles meet at the middle of their overlap (each pixel belongs to the tile in which it is
    furthest from an inner edge); the weights cross over linearly within ``overlap / 8`` of that point,
    so a tile weighs nothing within about ``3/8 * overlap`` of an inner edge. The first and last tiles
    weigh fully up to the image border (whole-image prediction sees the same border). A pixel's weights
    sum to one (or, where tiles step by less than a quarter of the overlap, to more than 1/4: the
    blend divides by the sum).
    """
    half = overlap / 8  # half-width of the crossover; at most a quarter of any overlap (>= overlap asked)
    out = []
    for k, start in enumerate(starts):
        centre = np.arange(start, start + size, dtype=np.float64) + 0.5  # pixel centres
        weight = np.ones(size, dtype=np.float64)
        for neighbour, sign in ((k - 1, 1.0), (k + 1, -1.0)):
            if 0 <= neighbour < len(starts):
                meet = (start + starts[neighbour] + size) / 2  # the middle of the two tiles' overlap
                if half > 0:
                    weight *= np.clip(sign * (centre - meet) / (2 * half) + 0.5, 0.0, 1.0)
                else:
                    weight *= sign * (centre - meet) > 0
        out.append(weight.astype(np.float32))
    return out


class Predictor:
    """A segmentation model ready for whole images of any size."""

    def __init__(
        self, forward: Forward, card: ModelCard, tile_size: int = 512, overlap: int = 128, batch_size: int = 4
    ):
        if tile_size % card.pad_divisor:
            raise ValueError(f"tile_size {tile_size} is not a multiple of the model's stride {card.pad_divisor}")
        self.forward, self.card = forward, card
        self.tile_size, self.overlap, self.batch_size = tile_size, min(overlap, tile_size - 1), batch_size
        self._mean = np.asarray(card.mean, dtype=np.float32) * 255
        self._std = np.asarray(card.std, dtype=np.float32) * 255
        self._pixel = None
        if card.pixel_transforms:  # augment.eval, as validation saw it (albumentations only when used)
            import albumentations as A

            from segflow import recipes

            self._pixel = recipes.reseed(A.Compose(recipes.build(card.pixel_transforms, None)), 0)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Model input for one image: (C, H', W') float32, padded bottom/right to the model's stride."""
        image = to_channels(image, self.card.in_channels)
        if self._pixel is not None:
            image = self._pixel(image=image)["image"].reshape(image.shape)
        h, w = image.shape[:2]
        d = self.card.pad_divisor
        padded = image[padded_index(h, -(-h // d) * d)[:, None], padded_index(w, -(-w // d) * d)[None, :]]
        return ((padded.astype(np.float32) - self._mean) / self._std).transpose(2, 0, 1)

    def _windows(self, height: int, width: int) -> Iterator[tuple[int, int, int, int]]:
        tile_h, tile_w = min(self.tile_size, height), min(self.tile_size, width)
        # Tiles start on the model's stride (tile_size is a multiple of it), so each tile sees the pixel
        # grid the whole image would: the overlap is rounded up to the stride when it is not a multiple.
        d = self.card.pad_divisor
        step = max(d, (self.tile_size - self.overlap) // d * d)
        for y in _axis_starts(height, tile_h, step):
            for x in _axis_starts(width, tile_w, step):
                yield y, x, tile_h, tile_w

    def logits(self, image: np.ndarray) -> np.ndarray:
        """Class logits of one image.

        Args:
            image: (H, W) or (H, W, C) uint8.

        Returns:
            (K, H, W) float32.
        """
        h, w = image.shape[:2]
        x = self.prepare(image)
        _, height, width = x.shape
        if height <= self.tile_size and width <= self.tile_size:
            return self.forward(x[None])[0][:, :h, :w]
        total = np.zeros((len(self.card.classes), height, width), dtype=np.float32)
        weight = np.zeros((height, width), dtype=np.float32)
        windows = list(self._windows(height, width))
        tile_h, tile_w = windows[0][2:]
        ys, xs = sorted({y for y, *_ in windows}), sorted({x for _, x, *_ in windows})
        along_y = dict(zip(ys, _axis_weights(ys, tile_h, self.overlap), strict=True))
        along_x = dict(zip(xs, _axis_weights(xs, tile_w, self.overlap), strict=True))
        for first in range(0, len(windows), self.batch_size):
            batch = windows[first : first + self.batch_size]
            out = self.forward(np.stack([x[:, y : y + th, xx : xx + tw] for y, xx, th, tw in batch]))
            for logits, (y, xx, th, tw) in zip(out, batch, strict=True):
                blend = np.outer(along_y[y], along_x[xx])
                total[:, y : y + th, xx : xx + tw] += logits * blend
                weight[y : y + th, xx : xx + tw] += blend
        return (total / np.maximum(weight, 1e-12))[:, :h, :w]

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Class ids of one image: (H, W) uint8."""
        return self.logits(image).argmax(0).astype(np.uint8)

    @property
    def streams(self) -> bool:
        """Whether :meth:`stream` gives :meth:`predict`'s result: not with ``augment.eval`` transforms (CLAHE and
        the like see the whole image, so a strip of it would be transformed differently)."""
        return self._pixel is None

    def _plan(self, height: int, width: int) -> tuple[list[list[tuple[int, int, int, int]]], int]:
        """The batches :meth:`logits` runs, in its order, and the most rows any batch keeps live.

        Before a batch runs, rows above its first tile are finished (tiles come row by row), so the
        rows live at once run from that tile to the bottom of the batch's last one.
        """
        windows = list(self._windows(height, width))
        batches = [windows[i : i + self.batch_size] for i in range(0, len(windows), self.batch_size)]
        return batches, max(batch[-1][0] + batch[-1][2] - batch[0][0] for batch in batches)

    def whole_bytes(self, height: int, width: int) -> int:
        """About the memory :meth:`predict` takes for an image held whole, beyond the model's own.

        Per padded pixel: the uint8 image, the float32 input, the logits' running sum and their quotient
        (K float32 each), the weights and their clamp, and the argmax's int64.
        """
        d = self.card.pad_divisor
        pixels = -(-height // d) * d * (-(-width // d) * d)
        per_pixel = 3 + 4 * self.card.in_channels + 8 * len(self.card.classes) + 8 + 8
        return pixels * per_pixel

    def stream_bytes(self, height: int, width: int, channels: int = 3) -> int:
        """About the memory :meth:`stream` takes, beyond the model's own: it grows with the width only.

        The live rows (:meth:`_plan`) hold the blended logits and weights (float32) and the image's rows as
        given and as the model's channels; a batch adds its tiles' input and logits.
        """
        d = self.card.pad_divisor
        padded_w = -(-width // d) * d
        _, live = self._plan(-(-height // d) * d, padded_w)
        classes, model_channels = len(self.card.classes), self.card.in_channels
        rows = live * (padded_w * 4 * (classes + 1) + width * (channels + model_channels))
        tile = min(self.tile_size, padded_w) * self.tile_size
        return rows + self.batch_size * tile * 4 * (model_channels + 2 * classes)

    def _input(self, tile: np.ndarray) -> np.ndarray:
        """One tile's model input, (C, h, w) float32: :meth:`prepare`'s arithmetic on the tile's pixels alone."""
        return ((tile.astype(np.float32) - self._mean) / self._std).transpose(2, 0, 1)

    def stream(self, strips: Iterable[np.ndarray], height: int, width: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Class ids of an image that arrives in row strips, handed on as rows finish: :meth:`predict`'s ids.

        The same tiles go through the model in the same batches, their logits are weighted and summed in
        the same order and divided the same way, so every id equals :meth:`predict`'s (ties included);
        only the rows some tile still covers are held. Images that fit one tile go through
        :meth:`predict` whole (they are small).

        Args:
            strips: the image top to bottom: (n, W) or (n, W, C) uint8 arrays whose n sum to ``height``.
            height, width: the image's size.

        Yields:
            (rows of the image as given, (n, W) uint8 class ids of those rows), top to bottom.

        Raises:
            ValueError: the strips do not make up a ``height`` x ``width`` image, or the model has
                ``augment.eval`` transforms (:attr:`streams`).
        """
        if not self.streams:
            raise ValueError("a model with augment.eval transforms predicts whole images only")
        d = self.card.pad_divisor
        padded_h, padded_w = -(-height // d) * d, -(-width // d) * d
        rows = _Rows(iter(strips), height, width, self.card.in_channels, padded_h, padded_w)
        if padded_h <= self.tile_size and padded_w <= self.tile_size:
            rows.fill(height)
            image = rows.given(0, height)
            yield image, self.predict(image)
            return
        batches, live = self._plan(padded_h, padded_w)
        tile_h, tile_w = batches[0][0][2:]
        ys = sorted({y for batch in batches for y, *_ in batch})
        xs = sorted({x for batch in batches for _, x, *_ in batch})
        along_y = dict(zip(ys, _axis_weights(ys, tile_h, self.overlap), strict=True))
        along_x = dict(zip(xs, _axis_weights(xs, tile_w, self.overlap), strict=True))
        total = np.zeros((len(self.card.classes), live, padded_w), dtype=np.float32)
        weight = np.zeros((live, padded_w), dtype=np.float32)
        top = 0  # the image row that row 0 of total and weight holds

        def finish(until: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            nonlocal top
            for start in range(0, min(until, height) - top, _FINISH_ROWS):  # a few rows' quotient at a time
                stop = min(start + _FINISH_ROWS, min(until, height) - top)
                blended = total[:, start:stop, :width] / np.maximum(weight[start:stop, :width], 1e-12)
                yield rows.given(top + start, top + stop), blended.argmax(0).astype(np.uint8)
            _shift(total, until - top, axis=1)
            _shift(weight, until - top, axis=0)
            rows.drop(until)
            top = until

        for batch in batches:
            if batch[0][0] > top:
                yield from finish(batch[0][0])
            rows.fill(min(batch[-1][0] + tile_h, height))
            out = self.forward(np.stack([self._input(rows.tile(y, x, th, tw)) for y, x, th, tw in batch]))
            for logits, (y, x, th, tw) in zip(out, batch, strict=True):
                blend = np.outer(along_y[y], along_x[x])
                total[:, y - top : y - top + th, x : x + tw] += logits * blend
                weight[y - top : y - top + th, x : x + tw] += blend
        yield from finish(padded_h)
        rows.end()


#: Finished rows divided and argmaxed at a time by :meth:`Predictor.stream` (so the quotient's float32
#: and the argmax's int64 temporaries stay small).
_FINISH_ROWS = 64


def _shift(array: np.ndarray, rows: int, axis: int) -> None:
    """Move ``array``'s rows (along ``axis``) up by ``rows`` and zero the rows freed at the end, in place.

    Copied ``rows`` at a time, so no copy overlaps its source and no temporary of the whole is made.
    """
    view = np.moveaxis(array, axis, 0)
    size = view.shape[0]
    rows = min(rows, size)
    if rows <= 0:
        return
    for start in range(rows, size, rows):
        stop = min(start + rows, size)
        view[start - rows : stop - rows] = view[start:stop]
    view[size - rows :] = 0


class _Rows:
    """The rows of a streamed image that tiles still need, as given and in the model's channels.

    Strips are taken from ``strips`` only as tiles reach them; rows are let go once finished.
    """

    def __init__(
        self, strips: Iterator[np.ndarray], height: int, width: int, channels: int, padded_h: int, padded_w: int
    ):
        self._strips, self.height, self.width, self.channels = strips, height, width, channels
        self._ys, self._xs = padded_index(height, padded_h), padded_index(width, padded_w)
        self._given: list[np.ndarray] = []  # consecutive strips from image row self._top on
        self._model: list[np.ndarray] = []  # the same rows, converted by to_channels
        self._top = self._bottom = 0

    def fill(self, until: int) -> None:
        """Take strips until rows up to ``until`` are held."""
        while self._bottom < until:
            strip = next(self._strips, None)
            if strip is None:
                raise ValueError(f"the strips ended at row {self._bottom} of {self.height}")
            if strip.ndim == 2:
                strip = strip[..., None]
            if strip.dtype != np.uint8 or strip.shape[1] != self.width or self._bottom + len(strip) > self.height:
                raise ValueError(f"a strip of {strip.shape} {strip.dtype} at row {self._bottom} does not fit the image")
            # Whole rows, as prepare converts them: the same arithmetic gives the same values.
            self._given.append(strip)
            self._model.append(to_channels(strip, self.channels))
            self._bottom += len(strip)

    def end(self) -> None:
        """Check that no rows are left over."""
        if next(self._strips, None) is not None:
            raise ValueError(f"the strips go on past row {self.height}")

    def drop(self, until: int) -> None:
        """Let go of rows above ``until``."""
        while self._given and self._top + len(self._given[0]) <= until:
            self._top += len(self._given.pop(0))
            self._model.pop(0)
        if self._given and self._top < until:
            cut = until - self._top
            self._given[0], self._model[0] = self._given[0][cut:].copy(), self._model[0][cut:].copy()
            self._top = until

    def _rows(self, strips: list[np.ndarray], start: int, stop: int, columns: slice) -> list[np.ndarray]:
        parts, row = [], self._top
        for strip in strips:
            low, high = max(start, row), min(stop, row + len(strip))
            if low < high:
                parts.append(strip[low - row : high - row, columns])
            row += len(strip)
        return parts

    def given(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the image as given, (n, W, C) uint8 (a copy: the strips are let go)."""
        return np.concatenate(self._rows(self._given, start, stop, slice(None)))

    def tile(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        """A tile of the padded image in the model's channels, reflected beyond the image as prepare pads it."""
        ys, xs = self._ys[y : y + height], self._xs[x : x + width]
        low, left = int(ys.min()), int(xs.min())
        block = np.concatenate(self._rows(self._model, low, int(ys.max()) + 1, slice(left, int(xs.max()) + 1)))
        return block[(ys - low)[:, None], (xs - left)[None, :]]


def torch_forward(model, device: str | None = None) -> Forward:
    """A PyTorch model as a :data:`Forward`, on ``device`` (default: CUDA when there is one)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise SegflowError(f"--device {device}: not a torch device; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise SegflowError(
            f"--device {device}: no CUDA GPU is visible to torch here (no driver, or CUDA_VISIBLE_DEVICES "
            "hides it); use --device cpu, or leave --device out"
        )
    model = model.to(device).eval()

    @torch.inference_mode()
    def forward(batch: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(np.ascontiguousarray(batch)).to(device)).float().cpu().numpy()

    return forward


def onnx_forward(path: Path) -> Forward:
    """An exported ``model.onnx`` as a :data:`Forward`, run by onnxruntime (CUDA when it has it)."""
    try:
        import onnxruntime
    except ImportError:
        raise SegflowError("--backend onnx needs onnxruntime: pip install -e '.[onnx]'") from None
    available = onnxruntime.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    session = onnxruntime.InferenceSession(str(path), providers=providers)
    name = session.get_inputs()[0].name

    def forward(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    return forward
