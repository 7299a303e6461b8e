"""Inference on images of any size: the one code path ``evaluate`` scores and ``segflow predict`` ships.

A :class:`Predictor` wraps a saved model (PyTorch from safetensors, or its
ONNX export) with the preprocessing its card describes: channels converted to
the model's, pixels scaled to 0-1 and normalised, the image padded at the
bottom/right to a multiple of the model's stride (raw value 0, as in
training's evaluation pipeline). Images that fit in ``tile_size`` go through
in one pass; larger ones in overlapping tiles whose logits are blended with
weights that are zero within ``overlap / 4`` of a seam and ramp up to one, so
memory is bounded by the tile and a model whose receptive field reaches at
most ``overlap / 4`` pixels gives exactly the whole-image logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

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


def _axis_weights(start: int, size: int, length: int, overlap: int) -> np.ndarray:
    """Blend weights along one axis of a tile: 0 within overlap/4 of an inner seam, ramping to 1."""
    index = np.arange(size, dtype=np.float32)
    inf = np.float32(np.inf)
    to_seam = np.minimum(
        index if start > 0 else inf,
        (size - 1 - index) if start + size < length else inf,
    )
    margin, ramp = overlap // 4, max(overlap // 4, 1)
    return np.clip((to_seam - margin + 1) / ramp, 0.0, 1.0)


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
        for first in range(0, len(windows), self.batch_size):
            batch = windows[first : first + self.batch_size]
            out = self.forward(np.stack([x[:, y : y + th, xx : xx + tw] for y, xx, th, tw in batch]))
            for logits, (y, xx, th, tw) in zip(out, batch, strict=True):
                blend = np.outer(_axis_weights(y, th, height, self.overlap), _axis_weights(xx, tw, width, self.overlap))
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
        from segflow.errors import SegflowError

        raise SegflowError("--backend onnx needs onnxruntime: pip install -e '.[onnx]'") from None
    available = onnxruntime.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    session = onnxruntime.InferenceSession(str(path), providers=providers)
    name = session.get_inputs()[0].name

    def forward(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    return forward
