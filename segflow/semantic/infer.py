"""Inference on images of any size: the one code path ``evaluate`` scores and ``segflow predict`` ships.

A :class:`Predictor` wraps a saved model (PyTorch from safetensors, or its
ONNX export) with the preprocessing its card describes: channels converted to
the model's, pixels scaled to 0-1 and normalised, the image padded at the
bottom/right to a multiple of the model's stride (raw value 0, as in
training's evaluation pipeline). Images that fit in ``tile_size`` go through
in one pass; larger ones in overlapping tiles, so memory is bounded by the tile.

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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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

            self._pixel = A.Compose(recipes.build(card.pixel_transforms, None), seed=0)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Model input for one image: (C, H', W') float32, padded bottom/right to the model's stride."""
        image = to_channels(image, self.card.in_channels)
        if self._pixel is not None:
            image = self._pixel(image=image)["image"].reshape(image.shape)
        h, w = image.shape[:2]
        d = self.card.pad_divisor
        padded = np.zeros((-(-h // d) * d, -(-w // d) * d, image.shape[2]), dtype=np.uint8)
        padded[:h, :w] = image
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
