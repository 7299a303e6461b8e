"""The dataset both training and evaluation read: manifest rows plus a pipeline."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, get_worker_info

from tasks._common import SegflowError, read_image, read_mask


class SegmentationDataset(Dataset):
    """Samples from ingest's layout, each passed through an albumentations pipeline.

    Items are ``(image (C, H, W) float32, mask (H, W) int64, index)``.
    """

    def __init__(self, root: Path, rows: pd.DataFrame, transform: A.Compose | None):
        self.root = Path(root)
        self.rows = rows.reset_index(drop=True)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The untransformed sample: (H, W, C) uint8 image, (H, W) uint8 mask."""
        row = self.rows.iloc[index]
        image, mask = read_image(self.root / row["image"]), read_mask(self.root / row["mask"])
        if image.shape[:2] != mask.shape:
            raise SegflowError(
                f"{self.root / row['mask']} is {mask.shape[1]}x{mask.shape[0]} but "
                f"{self.root / row['image']} is {image.shape[1]}x{image.shape[0]}; re-export the pair at one size"
            )
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, mask = self.load(index)
        out = self.transform(image=image, mask=mask)
        image_t = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        return image_t, torch.from_numpy(out["mask"].astype(np.int64)), index


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker its own augmentation stream.

    albumentations 2.x keeps its own generator, which every worker would
    otherwise copy unchanged; torch's per-worker seed is derived from the run's seed.
    """
    info = get_worker_info()
    info.dataset.transform.set_random_seed(torch.initial_seed() % 2**32)


def same_shape_batches(rows: pd.DataFrame, batch_size: int) -> list[list[int]]:
    """Batches of row indices whose images share one size, so they stack without resizing."""
    batches = []
    for _, group in rows.groupby(["height", "width"], sort=True):
        index = group.index.tolist()
        batches += [index[i : i + batch_size] for i in range(0, len(index), batch_size)]
    return batches
