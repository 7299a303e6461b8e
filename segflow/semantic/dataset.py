"""The dataset both training and evaluation read: manifest rows plus a pipeline."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from segflow import recipes
from segflow.errors import SegflowError
from segflow.io import read_image, read_mask
from segflow.params import IGNORE_INDEX

log = logging.getLogger(__name__)


class SegmentationDataset(Dataset):
    """Samples from ingest's layout, each passed through an albumentations pipeline.

    An item key is a row index, or ``(row index, seed)`` from :class:`SeededSampler`: the seed
    fixes that sample's augmentation, so a batch does not depend on which worker process built it.
    Items are ``(image (C, H, W) float32, mask (H, W) int64, index)``.
    """

    def __init__(self, root: Path, rows: pd.DataFrame, transform: A.Compose | None):
        self.root = Path(root)
        self.rows = rows.reset_index(drop=True)
        self.transform = transform
        self._cache: list[tuple[np.ndarray, np.ndarray]] | None = None
        # The evaluation pipeline pads bottom/right (segflow.augment.build_eval_transform).
        self._pads_bottom_right = transform is not None and any(
            isinstance(t, A.PadIfNeeded) and str(t.position) in ("top_left", "PositionType.TOP_LEFT")
            for t in transform.transforms
        )

    def __len__(self) -> int:
        return len(self.rows)

    def decoded_bytes(self) -> int:
        """Memory the decoded images and masks take (uint8), from the manifest's sizes."""
        channels = self.rows.get("channels", 3)
        return int((self.rows["height"] * self.rows["width"] * (channels + 1)).sum())

    def preload(self, budget_bytes: int, threads: int = 1) -> bool:
        """Decode every sample once and keep it in memory, if it fits in ``budget_bytes``.

        Call before the DataLoader starts its workers: forked workers share the decoded arrays.

        Returns:
            Whether the samples are now cached.
        """
        if not len(self) or self.decoded_bytes() > budget_bytes:
            return False
        with ThreadPoolExecutor(max(1, threads)) as pool:  # PNG decoding releases the GIL
            self._cache = list(pool.map(self._decode, range(len(self))))
        return True

    def _decode(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        row = self.rows.iloc[index]
        image, mask = read_image(self.root / row["image"]), read_mask(self.root / row["mask"])
        if image.shape[:2] != mask.shape:
            raise SegflowError(
                f"{self.root / row['mask']} is {mask.shape[1]}x{mask.shape[0]} but "
                f"{self.root / row['image']} is {image.shape[1]}x{image.shape[0]}; re-export the pair at one size"
            )
        return image, mask

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The untransformed sample: (H, W, C) uint8 image, (H, W) uint8 mask."""
        return self._cache[index] if self._cache is not None else self._decode(index)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, mask = self.load(index)
        if seed is not None:
            recipes.reseed(self.transform, seed)
        out = self.transform(image=image, mask=mask)
        mask_out = out["mask"]
        if self._pads_bottom_right and mask_out.shape != mask.shape:
            # The evaluation pipeline pads by reflection: those pixels are not the image's, never score them.
            mask_out = mask_out.copy()
            mask_out[mask.shape[0] :, :] = IGNORE_INDEX
            mask_out[:, mask.shape[1] :] = IGNORE_INDEX
        image_t = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        return image_t, torch.from_numpy(mask_out.astype(np.int64)), index


class SeededSampler(Sampler):
    """A shuffled pass over the dataset that also hands each sample its augmentation seed.

    The order and the seeds of epoch ``e`` come from ``(seed, e)`` alone (Lightning calls
    ``set_epoch`` before each epoch), so any worker count gives the same batches, and a run
    resumed at epoch ``e`` sees what an uninterrupted one would have seen. Under DDP each of
    ``world`` processes takes every ``world``-th sample from ``rank`` on (the pass padded by
    wrapping around, so every process runs the same number of steps).
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        seeds = rng.integers(0, 2**32, size=self.size, dtype=np.uint64)
        padded = [(int(order[i % self.size]), int(seeds[i % self.size])) for i in range(len(self) * self.world)]
        return iter(padded[self.rank :: self.world])


def same_shape_batches(rows: pd.DataFrame, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Batches of row indices whose images share one size, so they stack without resizing.

    Under DDP, process ``rank`` of ``world`` takes every ``world``-th image: each image is
    evaluated exactly once, and the per-class counts are summed across processes.

    Raises:
        SegflowError: fewer images than processes (a process would have nothing to validate).
    """
    if world > len(rows) > 0:
        raise SegflowError(
            f"the val split has {len(rows)} image(s), fewer than the {world} training processes; "
            "raise ingest.val_fraction or use fewer train.devices"
        )
    batches = []
    for _, group in rows.iloc[rank::world].groupby(["height", "width"], sort=True):
        index = group.index.tolist()
        batches += [index[i : i + batch_size] for i in range(0, len(index), batch_size)]
    return batches
