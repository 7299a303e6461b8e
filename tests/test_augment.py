"""augment: pipelines built from params, saved and reloaded; masks stay aligned."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segflow import augment
from segflow.data import ingest
from segflow.errors import SegflowError
from segflow.io import read_image
from segflow.layout import AUGMENT_PREVIEW, EVAL_PIPELINE, TRAIN_PIPELINE, load_transform
from segflow.params import IGNORE_INDEX, AugmentParams

# Geometry always on, colour never, identity normalisation: pixel values stay readable.
GEOMETRY_ONLY = AugmentParams(
    crop_size=40,
    overrides={
        "HorizontalFlip": {"p": 1.0},
        "VerticalFlip": {"p": 1.0},
        "RandomRotate90": {"p": 1.0},
        "Affine": {"p": 1.0},
        "RandomBrightnessContrast": None,
        "GaussNoise": None,
    },
    normalize={"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)},
)


def _coded_sample(size=48, seed=0):
    """An image whose red channel spells out its mask: class c is drawn as value 60 * c (+ 30)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), dtype=np.uint8)
    for cls, (y, x, r) in zip((1, 2, 3), rng.integers(8, size - 8, size=(3, 3)), strict=True):
        mask[max(0, y - r // 2) : y + r // 2 + 4, max(0, x - r // 2) : x + r // 2 + 4] = cls
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[..., 0] = 30 + 60 * mask
    return image, mask


def test_masks_stay_aligned_through_every_geometric_transform():
    transform = augment.build_train_transform(GEOMETRY_ONLY, seed=5)
    for trial in range(25):
        image, mask = _coded_sample(seed=trial)
        out = transform(image=image, mask=mask)
        red = out["image"][..., 0] * 255  # identity normalisation, scaled to 0-1
        labelled = out["mask"] != IGNORE_INDEX
        decoded = np.clip(np.round((red - 30) / 60), 0, 3)
        agreement = (decoded[labelled] == out["mask"][labelled]).mean()
        # Bilinear image vs nearest mask differ only along edges after rotation.
        assert agreement > 0.95, f"trial {trial}: image and mask disagree on {1 - agreement:.1%} of pixels"
        assert out["image"].shape[:2] == out["mask"].shape == (40, 40)


def test_padding_is_ignored_not_background():
    small = np.full((20, 20, 3), 200, dtype=np.uint8), np.ones((20, 20), dtype=np.uint8)
    out = augment.build_train_transform(GEOMETRY_ONLY.model_copy(update={"overrides": {"Affine": None}}), seed=1)(
        image=small[0], mask=small[1]
    )
    assert set(np.unique(out["mask"])) == {1, IGNORE_INDEX}


def test_eval_pipeline_pads_bottom_right_to_the_stride():
    image, mask = _coded_sample(size=50)
    out = augment.build_eval_transform(AugmentParams(pad_divisor=32))(image=image, mask=mask)
    assert out["image"].shape[:2] == (64, 64)
    assert np.array_equal(out["mask"][:50, :50], mask), "original pixels stay top-left, untouched"
    # The padding reflects the image (as inference pads); the dataset labels those pixels ignored
    # (tests/test_infer.py::test_validation_pads_by_reflection_and_never_scores_the_padding).
    assert np.array_equal(out["mask"][50:52, :50], mask[48:46:-1])


def test_run_saves_pipelines_that_reload_with_the_same_randomness(tiny_params, tiny_paths):
    ingest.run(tiny_params, tiny_paths)
    augment.run(tiny_params, tiny_paths)
    for name in (TRAIN_PIPELINE, EVAL_PIPELINE):
        saved = json.loads((tiny_paths.augment / name).read_text())
        assert saved["transform"]["__class_fullname__"] == "Compose"
    names = [
        t["__class_fullname__"]
        for t in json.loads((tiny_paths.augment / TRAIN_PIPELINE).read_text())["transform"]["transforms"]
    ]
    assert names[-1] == "Normalize" and "RandomCrop" in names and "HorizontalFlip" in names

    image, mask = _coded_sample(size=32)
    runs = []
    for _ in range(2):
        transform = load_transform(tiny_paths.augment / TRAIN_PIPELINE, seed=tiny_params.seed)
        runs.append([transform(image=image, mask=mask)["mask"] for _ in range(5)])
    assert all(np.array_equal(a, b) for a, b in zip(*runs, strict=True))
    assert len({m.tobytes() for m in runs[0]}) > 1, "successive samples are augmented differently"

    preview = read_image(tiny_paths.augment / AUGMENT_PREVIEW)
    assert preview.shape[0] > 2 * 32 and preview.shape[1] > 4 * 32


def test_loading_a_missing_or_foreign_pipeline_is_a_clear_error(tmp_path):
    with pytest.raises(SegflowError, match="run the augment stage first"):
        load_transform(tmp_path / "train.json")
    (tmp_path / "x.json").write_text('{"something": "else"}')
    with pytest.raises(SegflowError, match="not an albumentations pipeline"):
        load_transform(tmp_path / "x.json")
