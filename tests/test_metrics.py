"""IoU/Dice on hand-made masks, with each reduction pinned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segflow.io import read_mask
from segflow.params import IGNORE_INDEX
from segflow.semantic.metrics import confusion_counts, per_image_iou, summarize
from tests.conftest import isbi_or_skip

CLASSES = ["background", "a", "b"]


def _summary(pred, target, classes=CLASSES):
    counts = confusion_counts(torch.tensor(pred)[None], torch.tensor(target)[None], len(classes))
    return summarize(*counts, classes, background="background")


TARGET = [
    [0, 0, 1, 1],
    [0, 0, 1, 1],
    [2, 2, 0, 0],
    [2, 2, 0, 0],
]


def test_perfect_prediction_scores_one():
    result = _summary(TARGET, TARGET)
    assert result["iou"]["per_class"] == {"background": 1.0, "a": 1.0, "b": 1.0}
    assert result["iou"]["macro"] == result["dice"]["macro"] == result["pixel_accuracy"] == 1.0


def test_disjoint_prediction_scores_zero():
    pred = [[1 if v == 0 else 0 for v in row] for row in TARGET]  # background <-> a, b -> background
    result = _summary(pred, TARGET)
    assert result["iou"]["per_class"]["a"] == 0.0
    assert result["iou"]["per_class"]["b"] == 0.0
    assert result["pixel_accuracy"] == 0.0


def test_partial_overlap_by_hand():
    pred = [
        [0, 0, 1, 1],
        [0, 1, 1, 1],  # one background pixel called "a"
        [2, 2, 0, 0],
        [2, 0, 0, 0],  # one "b" pixel called background
    ]
    result = _summary(pred, TARGET)
    iou = result["iou"]["per_class"]
    # a: tp 4, fp 1, fn 0 -> 4/5; b: tp 3, fp 0, fn 1 -> 3/4; background: tp 7, fp 1, fn 1 -> 7/9
    assert iou["a"] == pytest.approx(4 / 5)
    assert iou["b"] == pytest.approx(3 / 4)
    assert iou["background"] == pytest.approx(7 / 9)
    assert result["iou"]["macro"] == pytest.approx((4 / 5 + 3 / 4 + 7 / 9) / 3, abs=1e-6)
    assert result["iou"]["macro_foreground"] == pytest.approx((4 / 5 + 3 / 4) / 2, abs=1e-6)
    # The background is the class params.yaml names, not whichever comes first; none named: all are objects.
    counts = confusion_counts(torch.tensor([pred]), torch.tensor([TARGET]), 3)
    named_b = summarize(*counts, CLASSES, background="b")["iou"]["macro_foreground"]
    assert named_b == pytest.approx((4 / 5 + 7 / 9) / 2, abs=1e-6)
    assert summarize(*counts, CLASSES, background=None)["iou"]["macro_foreground"] == result["iou"]["macro"]
    # Dice is F1 on pixel counts: 2 IoU / (1 + IoU) per class.
    assert result["dice"]["per_class"]["a"] == pytest.approx(2 * 0.8 / 1.8, abs=1e-6)
    assert result["pixel_accuracy"] == pytest.approx(14 / 16)


def test_class_absent_everywhere_is_undefined_not_perfect():
    target = [[0, 0], [1, 1]]
    result = _summary(target, target)
    assert result["iou"]["per_class"]["b"] is None  # empty vs empty
    assert result["iou"]["macro"] == 1.0  # mean over the two classes that occur
    absent_but_predicted = _summary([[0, 2], [1, 1]], target)
    assert absent_but_predicted["iou"]["per_class"]["b"] == 0.0  # a false alarm is defined, and wrong


def test_ignored_pixels_count_nowhere():
    target = [[0, IGNORE_INDEX], [1, IGNORE_INDEX]]
    pred = [[0, 1], [1, 2]]
    result = _summary(pred, target)
    assert result["iou"]["per_class"]["background"] == 1.0
    assert result["iou"]["per_class"]["a"] == 1.0
    assert result["iou"]["per_class"]["b"] is None
    assert result["pixel_accuracy"] == 1.0


def test_dataset_level_counts_are_summed_over_images():
    # Image 1: "a" perfect (4 px). Image 2: "a" found in 1 of 4 px. Summed: 5 / 8 (not the mean 0.625 of 1 and 0.25).
    target = torch.tensor([[[1, 1], [1, 1]], [[1, 1], [1, 1]]])
    pred = torch.tensor([[[1, 1], [1, 1]], [[1, 0], [0, 0]]])
    counts = confusion_counts(pred, target, 2)
    assert summarize(*counts, ["background", "a"])["iou"]["per_class"]["a"] == pytest.approx(5 / 8)
    per_image = per_image_iou(*counts)
    assert per_image[:, 1].tolist() == pytest.approx([1.0, 0.25])


def test_real_membrane_masks():
    """ISBI 2012: membrane (0) vs cell (255) masks mapped to class ids; a shifted mask scores below 1."""
    root = isbi_or_skip()
    masks = [read_mask(p) for p in sorted((root / "masks").glob("*.png"))[:3]]
    assert all(m.shape == (512, 512) and set(np.unique(m)) <= {0, 255} for m in masks)
    target = torch.from_numpy(np.stack([(m == 255).astype(np.int64) for m in masks]))  # 0 membrane, 1 cell
    shifted = torch.roll(target, shifts=3, dims=2)
    same = summarize(*confusion_counts(target, target, 2), ["membrane", "cell"])
    moved = summarize(*confusion_counts(shifted, target, 2), ["membrane", "cell"])
    assert same["iou"]["macro"] == 1.0
    assert 0.2 < moved["iou"]["per_class"]["membrane"] < 0.9
    membrane_share = float((target == 0).float().mean())
    assert 0.15 < membrane_share < 0.35
