"""Inference for ``task: instance``, the one path evaluate and ``segflow predict`` share.

An image goes through the model's own preprocessing (``preprocess.json``: the pixel transforms,
reflection padding to the stride, normalisation), then Mask R-CNN; detections are cut back to the
image (padding holds reflected copies of objects near the border: what lies only there is dropped),
masks thresholded at ``predict.mask_threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import torch

from segflow.instance.card import load
from segflow.instance.metrics import ImagePrediction


@dataclass
class Instances:
    """What the model found in one image: ``masks`` (K, H, W) bool, ``classes`` (K,) 0-based category
    indices, ``scores`` (K,) float, ``boxes`` (K, 4) x0, y0, x1, y1 of the masks; best score first."""

    masks: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray

    def as_prediction(self, image_id: str) -> ImagePrediction:
        return ImagePrediction(image_id, self.masks, self.classes, self.scores)

    def id_image(self, min_score: float = 0.0) -> np.ndarray:
        """(H, W) uint16 instance ids (1 = best scoring); where objects overlap, the higher score wins."""
        height, width = self.masks.shape[1:] if len(self.masks) else (0, 0)
        out = np.zeros((height, width), dtype=np.uint16)
        kept = [k for k in range(len(self.scores)) if self.scores[k] >= min_score]
        for rank, k in reversed(list(enumerate(kept, start=1))):  # lowest score first, best painted last
            out[self.masks[k]] = rank
        return out


class Predictor:
    """A loaded instance model and its preprocessing."""

    def __init__(self, model_dir: Path, max_detections: int, score_threshold: float, mask_threshold: float):
        self.model, self.card = load(model_dir, max_detections, score_threshold)
        self.transform = A.load(str(Path(model_dir) / self.card.preprocess), data_format="json")
        self.mask_threshold = mask_threshold

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray]) -> list[Instances]:
        """Detect the objects of each image ((H, W, C) uint8, C as the card's ``in_channels``)."""
        tensors = []
        for image in images:
            out = self.transform(image=image)["image"]
            tensor = torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))
            tensors.append(tensor.expand(3, -1, -1).contiguous() if tensor.shape[0] == 1 else tensor)
        found = []
        for image, output in zip(images, self.model(tensors), strict=True):
            found.append(_cut(output, image.shape[0], image.shape[1], self.mask_threshold))
        return found


def _cut(output: dict, height: int, width: int, threshold: float) -> Instances:
    """Detections of the padded image, cut back to the image; empty masks dropped."""
    masks = (output["masks"][:, 0, :height, :width] > threshold).numpy()
    keep = masks.reshape(len(masks), -1).any(1) if len(masks) else np.zeros(0, dtype=bool)
    masks = masks[keep]
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for k, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        boxes[k] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return Instances(
        masks=masks.reshape(len(masks), height, width),
        classes=(output["labels"].numpy()[keep] - 1).astype(np.int64),
        scores=output["scores"].numpy()[keep].astype(np.float64),
        boxes=boxes,
    )
