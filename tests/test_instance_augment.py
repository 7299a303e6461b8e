"""Augmentation keeps every object's mask, box and category together, over every preset (task: instance)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from segflow import recipes
from segflow.augment import build_eval_transform, build_train_transform
from segflow.data import synthetic
from segflow.instance.dataset import InstanceDataset
from segflow.params import AugmentParams

SIZE = 80


class _Memory(InstanceDataset):
    """An InstanceDataset over scenes held in memory (the same __getitem__ as training's)."""

    def __init__(self, scenes, objects, transform, min_area):
        rows = pd.DataFrame({"id": [f"s{i}" for i in range(len(scenes))], "height": SIZE, "width": SIZE})
        super().__init__(".", rows, objects, transform, min_area)
        self._cache = scenes


@pytest.fixture(scope="module")
def scenes():
    """Demo scenes with their objects, ids pushed above 255 for some (the crowded case)."""
    found, objects = [], {}
    for i, item in enumerate(synthetic.instance_items(5, 6, 3, SIZE, 4, 8, 0.05)):
        image, ids, table, _ = item.read()
        if i % 2:  # ids past 255 must survive the pipelines' fill value (255) for invented pixels
            ids = np.where(ids > 0, ids + 254, 0).astype(np.uint16)  # the first object is 255
            table = [{**t, "instance": t["instance"] + 254} for t in table]
        found.append((image, ids))
        objects[f"s{i}"] = {t["instance"]: (t["class"], False) for t in table}
    return found, objects


@pytest.mark.parametrize("preset", sorted(recipes.PRESETS))
def test_every_object_keeps_its_mask_box_and_category(scenes, preset):
    images, objects = scenes
    params = AugmentParams(preset=preset, crop_size=64, min_instance_area=8)
    dataset = _Memory(images, objects, build_train_transform(params, seed=1), params.min_instance_area)
    for index in range(len(dataset)):
        for seed in range(4):
            image, target, _ = dataset[(index, seed)]
            masks, boxes, labels, ids = (target[k].numpy() for k in ("masks", "boxes", "labels", "ids"))
            assert image.shape == (3, 64, 64) and masks.shape[1:] == (64, 64)
            assert len(masks) == len(boxes) == len(labels) == len(ids)
            assert (masks.sum(0) <= 1).all()  # objects never share a pixel
            for mask, box, label, instance in zip(masks, boxes, labels, ids, strict=True):
                ys, xs = np.nonzero(mask)
                assert len(ys) >= 8  # smaller leftovers of a crop are dropped
                assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                assert label == objects[f"s{index}"][int(instance)][0] + 1


def test_evaluation_keeps_every_object_whole(scenes):
    images, objects = scenes
    params = AugmentParams(crop_size=64, pad_divisor=32)
    dataset = _Memory(images, objects, build_eval_transform(params), 1)
    for index, (_, ids) in enumerate(images):
        _, target, _ = dataset[index]
        kept = sorted(int(i) for i in target["ids"])
        assert kept == sorted(int(i) for i in np.unique(ids) if i)
        for mask, instance in zip(target["masks"].numpy(), target["ids"].numpy(), strict=True):
            # padded to 96 by reflection: the copies in the padding are not the object
            np.testing.assert_array_equal(mask[:SIZE, :SIZE], ids == instance)
            assert not mask[SIZE:].any() and not mask[:, SIZE:].any()
