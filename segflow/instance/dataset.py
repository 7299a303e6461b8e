"""Images and their objects from ingest's layout, through the augmentation pipelines, as Mask R-CNN targets."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from segflow import recipes
from segflow.errors import SegflowError
from segflow.io import read_image, read_instances

#: Instance ids travel through albumentations shifted by this: the pipelines label the pixels they invent
#: (padding, borders) 255, which must not become an object.
_SHIFT = 256


def objects_by_image(table: pd.DataFrame, categories: list[str]) -> dict[str, dict[int, tuple[int, bool]]]:
    """``{image id: {instance id: (category index, crowd)}}`` from ingest's ``instances.csv``.

    Raises:
        SegflowError: the table names a category params.yaml does not list (the data changed under it).
    """
    index = {name: i for i, name in enumerate(categories)}
    unknown = sorted(set(table["class"]) - set(index))
    if unknown:
        raise SegflowError(
            f"instances.csv names categories {unknown} that classes in params.yaml does not list; rerun ingest"
        )
    found: dict[str, dict[int, tuple[int, bool]]] = {}
    for row in table.itertuples():
        crowd = row.crowd if isinstance(row.crowd, bool) else str(row.crowd).lower() == "true"
        found.setdefault(row.id, {})[int(row.instance)] = (index[row[3]], crowd)
    return found


def targets(instances: np.ndarray, objects: dict[int, tuple[int, bool]], min_area: int) -> dict[str, np.ndarray]:
    """Mask R-CNN targets of one (augmented) image: its visible, non-crowd objects of ``min_area`` pixels.

    Args:
        instances: (H, W) integer instance ids (0 = background).
        objects: instance id -> (category index, crowd).

    Returns:
        ``boxes`` (N, 4) float32 x0, y0, x1, y1 (pixel edges), ``labels`` (N,) int64 (1-based: 0 is
        background), ``masks`` (N, H, W) uint8, ``ids`` (N,) the instance ids kept. Crowd regions are not
        targets (torchvision's Mask R-CNN has no ignore regions).
    """
    ids, areas = np.unique(instances, return_counts=True)
    keep = [
        int(i)
        for i, area in zip(ids, areas, strict=True)
        if i and area >= min_area and int(i) in objects and not objects[int(i)][1]
    ]
    height, width = instances.shape
    masks = np.zeros((len(keep), height, width), dtype=np.uint8)
    boxes = np.zeros((len(keep), 4), dtype=np.float32)
    for n, instance in enumerate(keep):
        region = instances == instance
        masks[n] = region
        ys, xs = np.nonzero(region)
        boxes[n] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    labels = np.asarray([objects[i][0] + 1 for i in keep], dtype=np.int64)
    return {"boxes": boxes, "labels": labels, "masks": masks, "ids": np.asarray(keep, dtype=np.int64)}


class InstanceDataset(Dataset):
    """Samples from ingest's layout (task: instance), each passed through an albumentations pipeline.

    Keys are row indices or ``(row index, seed)`` (:class:`segflow.semantic.dataset.SeededSampler`).
    Items are ``(image (3, H, W) float32, target dict of tensors, index)``; grayscale images are
    repeated to three channels after normalisation (the backbones take RGB).
    """

    def __init__(
        self,
        root: Path,
        rows: pd.DataFrame,
        objects: dict[str, dict[int, tuple[int, bool]]],
        transform: A.Compose | None,
        min_area: int = 1,
    ):
        self.root = Path(root)
        self.rows = rows.reset_index(drop=True)
        self.objects = objects
        self.transform = transform
        self.min_area = min_area
        self._cache: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def decoded_bytes(self) -> int:
        """Memory the decoded images and instance masks take, from the manifest's sizes."""
        channels = self.rows.get("channels", 3)
        return int((self.rows["height"] * self.rows["width"] * (channels + 2)).sum())

    def preload(self, budget_bytes: int, threads: int = 1) -> bool:
        """Decode every sample once and keep it in memory, if it fits in ``budget_bytes``."""
        if not len(self) or self.decoded_bytes() > budget_bytes:
            return False
        with ThreadPoolExecutor(max(1, threads)) as pool:
            self._cache = list(pool.map(self._decode, range(len(self))))
        return True

    def _decode(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        row = self.rows.iloc[index]
        image, instances = read_image(self.root / row["image"]), read_instances(self.root / row["mask"])
        if image.shape[:2] != instances.shape:
            raise SegflowError(f"{self.root / row['mask']}: not the size of its image; rerun dvc repro ingest")
        return image, instances

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The untransformed sample: (H, W, C) uint8 image, (H, W) uint16 instance ids."""
        return self._cache[index] if self._cache is not None else self._decode(index)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, instances = self.load(index)
        shifted = np.where(instances > 0, instances.astype(np.int32) + _SHIFT, 0).astype(np.uint16)
        if seed is not None:
            recipes.reseed(self.transform, seed)
        out = self.transform(image=image, mask=shifted)
        moved = out["mask"].astype(np.int32)
        ids = np.where(moved >= _SHIFT, moved - _SHIFT, 0)
        if seed is None:  # the eval pipeline pads by reflection, copying objects into the padding: cut them out
            ids[instances.shape[0] :, :] = 0
            ids[:, instances.shape[1] :] = 0
        target = targets(ids, self.objects.get(self.rows.at[index, "id"], {}), self.min_area)
        tensor = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        if tensor.shape[0] == 1:
            tensor = tensor.expand(3, -1, -1).contiguous()
        return tensor, {k: torch.from_numpy(v) for k, v in target.items()}, index


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict], list[int]]:
    """Lists, not stacked tensors: Mask R-CNN takes images of different sizes and targets of any count."""
    images, targets_, indices = zip(*batch, strict=True)
    return list(images), list(targets_), list(indices)
