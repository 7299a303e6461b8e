"""Inference for ``task: instance``, the one path evaluate and ``segflow predict`` share.

An image goes through the model's own preprocessing (``preprocess.json``: the pixel transforms,
reflection padding to the stride, normalisation), then Mask R-CNN; detections are cut back to the
image (padding holds reflected copies of objects near the border: what lies only there is dropped),
masks thresholded at ``predict.mask_threshold``.

Images larger than ``predict.tile_size`` are predicted in tiles overlapping by ``predict.overlap``:
each tile keeps the objects whose box centre lies in its own share of the overlaps (the half nearer
its centre), so an object seen whole by two tiles is kept once, and what remains is merged by mask
IoU (``predict.merge_iou``, the higher score kept). Objects are held as their box and the mask inside
it, so memory follows the objects and one tile, not the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import torch

from segflow.instance.card import load
from segflow.instance.metrics import ImagePrediction


class MaskStack:
    """(K, H, W) bool masks held as each object's box and the mask inside it.

    Indexing gives one object's full-size (H, W) mask, made when asked, so memory follows the
    objects, not K times the image: a slide of thousands of cells costs its cells' boxes.
    ``np.asarray`` makes the whole dense stack (what a small image's caller may want).
    """

    def __init__(self, crops: list[np.ndarray], boxes: np.ndarray, height: int, width: int):
        if len(crops) != len(boxes):
            raise ValueError(f"{len(crops)} masks for {len(boxes)} boxes")
        self.crops, self.boxes = crops, np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        self.shape = (len(crops), height, width)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, k: int) -> np.ndarray:
        if not isinstance(k, int | np.integer):
            raise TypeError("index one object at a time (np.asarray(masks) makes the whole stack)")
        out = np.zeros(self.shape[1:], dtype=bool)
        x0, y0, x1, y1 = self.boxes[k]
        out[y0:y1, x0:x1] = self.crops[k]
        return out

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def __array__(self, dtype=None, copy=None):
        dense = np.zeros(self.shape, dtype=bool)
        for k, ((x0, y0, x1, y1), crop) in enumerate(zip(self.boxes, self.crops, strict=True)):
            dense[k, y0:y1, x0:x1] = crop
        return dense if dtype is None else dense.astype(dtype)


@dataclass
class Instances:
    """What the model found in one image, best score first: ``boxes`` (K, 4) int x0, y0, x1, y1 (end
    exclusive) tight around each mask, ``crops`` the bool mask inside each box, ``classes`` (K,) 0-based
    category indices, ``scores`` (K,) float, ``size`` the image's (H, W). ``masks`` gives (H, W) masks
    one object at a time."""

    crops: list[np.ndarray]
    boxes: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    size: tuple[int, int]

    @classmethod
    def from_masks(cls, masks: np.ndarray, classes: np.ndarray, scores: np.ndarray) -> Instances:
        """From dense (K, H, W) masks (empty ones dropped)."""
        masks = np.asarray(masks, dtype=bool)
        crops, boxes, keep = [], [], []
        for k, mask in enumerate(masks):
            box = _tight_box(mask)
            if box is None:
                continue
            x0, y0, x1, y1 = box
            crops.append(mask[y0:y1, x0:x1].copy())
            boxes.append(box)
            keep.append(k)
        return cls(
            crops=crops,
            boxes=np.asarray(boxes, dtype=np.int64).reshape(-1, 4),
            classes=np.asarray(classes, dtype=np.int64)[keep],
            scores=np.asarray(scores, dtype=np.float64)[keep],
            size=(int(masks.shape[1]), int(masks.shape[2])),
        )

    @property
    def masks(self) -> MaskStack:
        return MaskStack(self.crops, self.boxes, *self.size)

    def as_prediction(self, image_id: str) -> ImagePrediction:
        return ImagePrediction(image_id, self.masks, self.classes, self.scores)

    def id_image(self, min_score: float = 0.0) -> np.ndarray:
        """(H, W) uint16 instance ids (1 = best scoring); where objects overlap, the higher score wins."""
        out = np.zeros(self.size, dtype=np.uint16)
        kept = [k for k in range(len(self.scores)) if self.scores[k] >= min_score]
        for rank, k in reversed(list(enumerate(kept, start=1))):  # lowest score first, best painted last
            x0, y0, x1, y1 = self.boxes[k]
            out[y0:y1, x0:x1][self.crops[k]] = rank
        return out


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


class Predictor:
    """A loaded instance model and its preprocessing; :meth:`predict` is the API (tiles included)."""

    def __init__(
        self,
        model_dir: Path,
        max_detections: int,
        score_threshold: float,
        mask_threshold: float,
        tile_size: int = 512,
        overlap: int = 128,
        merge_iou: float = 0.5,
    ):
        self.model, self.card = load(model_dir, max_detections, score_threshold)
        self.transform = A.load(str(Path(model_dir) / self.card.preprocess), data_format="json")
        self.mask_threshold = mask_threshold
        self.tile_size, self.overlap, self.merge_iou = tile_size, overlap, merge_iou
        self.max_detections = max_detections

    def predict(self, image: np.ndarray) -> Instances:
        """The objects of one (H, W[, C]) uint8 image, best score first; in tiles when it is large."""
        image = image[..., None] if image.ndim == 2 else image
        height, width = image.shape[:2]
        if max(height, width) <= self.tile_size:
            return self([image])[0]
        return self._tiled(image)

    def _tiled(self, image: np.ndarray) -> Instances:
        height, width = image.shape[:2]
        ys, xs = tile_starts(height, self.tile_size, self.overlap), tile_starts(width, self.tile_size, self.overlap)
        pieces: list[tuple[np.ndarray, np.ndarray, int, float]] = []  # (box, mask in box, class, score)
        for y in ys:
            for x in xs:
                tile = image[y : y + self.tile_size, x : x + self.tile_size]
                (found,) = self([tile])
                y_lo, y_hi = _share(ys, y, self.tile_size, height)
                x_lo, x_hi = _share(xs, x, self.tile_size, width)
                for k in range(len(found.scores)):
                    x0, y0, x1, y1 = (int(v) for v in found.boxes[k])
                    cy, cx = y + (y0 + y1) / 2, x + (x0 + x1) / 2
                    if not (y_lo <= cy < y_hi and x_lo <= cx < x_hi):
                        continue  # another tile holds this object's centre: it is kept there
                    box = np.asarray([x0 + x, y0 + y, x1 + x, y1 + y], dtype=np.int64)
                    pieces.append((box, found.crops[k], int(found.classes[k]), float(found.scores[k])))
        kept = merge(pieces, self.merge_iou)[: self.max_detections]
        return Instances(
            crops=[inner for _, inner, _, _ in kept],
            boxes=np.asarray([b for b, _, _, _ in kept], dtype=np.int64).reshape(-1, 4),
            classes=np.asarray([c for _, _, c, _ in kept], dtype=np.int64),
            scores=np.asarray([s for _, _, _, s in kept], dtype=np.float64),
            size=(height, width),
        )

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


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one side: ``tile`` apart less ``overlap``, the last flush with the edge."""
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step))
    return [*starts, size - tile]


def _share(starts: list[int], start: int, tile: int, size: int) -> tuple[float, float]:
    """The part of the side that the tile at ``start`` answers for: up to the middles of its overlaps."""
    index = starts.index(start)
    low = 0.0 if index == 0 else (start + starts[index - 1] + tile) / 2
    high = float(size) if index == len(starts) - 1 else (starts[index + 1] + start + tile) / 2
    return low, high


def merge(pieces: list[tuple[np.ndarray, np.ndarray, int, float]], threshold: float) -> list:
    """Greedy by score: a piece overlapping a kept one by mask IoU >= ``threshold`` is a duplicate.

    Args:
        pieces: (box x0, y0, x1, y1 in the image, the bool mask inside the box, class, score).
    """
    kept: list[tuple[np.ndarray, np.ndarray, int, float]] = []
    for piece in sorted(pieces, key=lambda p: -p[3]):
        if not any(_box_mask_iou(piece, other) >= threshold for other in kept):
            kept.append(piece)
    return kept


def _box_mask_iou(a, b) -> float:
    (ba, ma, _, _), (bb, mb, _, _) = a, b
    x0, y0 = max(ba[0], bb[0]), max(ba[1], bb[1])
    x1, y1 = min(ba[2], bb[2]), min(ba[3], bb[3])
    if x0 >= x1 or y0 >= y1:
        return 0.0
    inter = np.logical_and(
        ma[y0 - ba[1] : y1 - ba[1], x0 - ba[0] : x1 - ba[0]], mb[y0 - bb[1] : y1 - bb[1], x0 - bb[0] : x1 - bb[0]]
    ).sum()
    union = ma.sum() + mb.sum() - inter
    return float(inter / union) if union else 0.0


def _cut(output: dict, height: int, width: int, threshold: float) -> Instances:
    """Detections of the padded image, cut back to the image; empty masks dropped."""
    masks = (output["masks"][:, 0, :height, :width] > threshold).numpy()
    return Instances.from_masks(
        masks.reshape(len(masks), height, width),
        (output["labels"].numpy() - 1).astype(np.int64),
        output["scores"].numpy().astype(np.float64),
    )
