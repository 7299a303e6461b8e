"""Augmentation recipes: presets, overrides and checks; masks stay correct through every preset."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from segflow import augment, recipes
from segflow.errors import SegflowError
from segflow.params import IGNORE_INDEX, AugmentParams, ParamsError, parse_params
from segflow.semantic.card import ModelCard
from segflow.semantic.infer import Predictor

IDENTITY = {"mean": [0.0], "std": [1.0]}
CROP = 48


def _coded_sample(size: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Big blobs of classes 1-3 on class 1 (no 0 anywhere); the image spells each class as 40 + 60 * id."""
    rng = np.random.default_rng(seed)
    mask = np.ones((size, size), dtype=np.uint8)
    for cls in (2, 3, 2, 3):
        y, x = rng.integers(0, size - size // 4, size=2)
        h, w = rng.integers(size // 6, size // 3, size=2)
        mask[y : y + h, x : x + w] = cls
    image = np.repeat((40 + 60 * mask)[..., None], channels, axis=2).astype(np.uint8)
    return image, mask


def _geometric_only(preset: str) -> AugmentParams:
    """The preset with its pixel-level transforms removed: the image still spells the mask afterwards."""
    kinds = recipes.catalogue()
    pixel = [name for name in recipes.names(recipes.PRESETS[preset]) if kinds[name]["kind"] == "pixel"]
    return AugmentParams(preset=preset, crop_size=CROP, normalize=IDENTITY, overrides=dict.fromkeys(pixel))


def test_the_catalogue_is_the_installed_albumentations():
    assert recipes.catalogue() == recipes.build_catalogue()["transforms"], (
        "segflow/transforms.json is stale: rewrite it with python -m segflow.recipes"
    )


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("preset", sorted(recipes.PRESETS))
def test_every_preset_keeps_masks_correct(preset, channels):
    """Geometry moves image and mask together; ids never blend; invented pixels are ignored, never class 0."""
    full = augment.build_train_transform(
        AugmentParams(preset=preset, crop_size=CROP, normalize=IDENTITY), seed=3, channels=channels
    )
    geometric = augment.build_train_transform(_geometric_only(preset), seed=3, channels=channels)
    agreeing = compared = 0
    for trial in range(12):
        image, mask = _coded_sample(72 if trial % 2 else 40, channels, seed=trial)  # some smaller than the crop
        out = full(image=image, mask=mask)
        assert out["image"].shape == (CROP, CROP, channels) and out["mask"].shape == (CROP, CROP)
        assert out["mask"].dtype == np.uint8
        values = set(np.unique(out["mask"]).tolist())
        assert values <= {1, 2, 3, IGNORE_INDEX}, f"trial {trial}: mask values {values} (blended or invented ids)"

        out = geometric(image=image, mask=mask)
        spelt = out["image"][..., 0] * 255
        # Bilinear image against nearest mask differ only along class edges: compare inside regions.
        kernel = np.ones((5, 5), np.uint8)
        inside = cv2.erode(out["mask"], kernel) == cv2.dilate(out["mask"], kernel)
        labelled = inside & (out["mask"] != IGNORE_INDEX) & (spelt > 20)  # not padding, not a dropout hole
        decoded = np.clip(np.round((spelt - 40) / 60), 0, 3)
        agreeing += int((decoded[labelled] == out["mask"][labelled]).sum())
        compared += int(labelled.sum())
    assert compared > 0.2 * 12 * CROP * CROP, "too few pixels compared for the check to mean anything"
    assert agreeing / compared > 0.99, f"image and mask disagree on {1 - agreeing / compared:.1%} of pixels"


def test_invented_pixels_are_ignored_by_every_geometric_transform():
    """Rotations, elastic and grid warps, scale-down: the border they make up is 255, not background."""
    mask = np.ones((64, 64), dtype=np.uint8)
    image = np.full((64, 64, 3), 200, dtype=np.uint8)
    for step in [
        {"name": "Affine", "rotate": [30, 30], "p": 1.0},
        {"name": "Rotate", "limit": [30, 30], "p": 1.0},
        {"name": "ElasticTransform", "alpha": 300, "sigma": 5, "p": 1.0},
        {"name": "GridDistortion", "distort_limit": [0.5, 0.5], "p": 1.0},
        {"name": "SafeRotate", "limit": [30, 30], "p": 1.0},
        {"name": "OpticalDistortion", "distort_limit": [0.5, 0.5], "p": 1.0},
    ]:
        params = AugmentParams(preset="none", train=[step], crop_size=64, normalize=IDENTITY)
        out = augment.build_train_transform(params, seed=0)(image=image, mask=mask)
        assert set(np.unique(out["mask"]).tolist()) == {1, IGNORE_INDEX}, step["name"]


def test_overrides_change_remove_and_train_appends():
    params = AugmentParams(
        preset="default",
        overrides={"Affine": {"p": 0.9, "rotate": [-5, 5]}, "GaussNoise": None},
        train=["CLAHE", {"name": "Sharpen", "p": 0.2}],
    )
    steps = params.train_recipe()
    names = [s["name"] for s in steps]
    assert "GaussNoise" not in names and names[-2:] == ["CLAHE", "Sharpen"]
    affine = next(s for s in steps if s["name"] == "Affine")
    assert affine["p"] == 0.9 and affine["rotate"] == [-5, 5] and affine["scale"] == [0.85, 1.15]
    assert recipes.PRESETS["default"][4]["p"] == 0.3, "overrides never change the preset itself"
    transform = augment.build_train_transform(params, seed=1)
    assert [type(t).__name__ for t in transform.transforms][-3:] == ["CLAHE", "Sharpen", "Normalize"]


def test_street_scales_before_its_crop():
    names = [type(t).__name__ for t in augment.build_train_transform(AugmentParams(preset="street"), 0).transforms]
    assert names[:3] == ["RandomScale", "PadIfNeeded", "RandomCrop"]


@pytest.mark.parametrize(
    ("augment_section", "message"),
    [
        (
            {"train": [{"name": "HorizntalFlip"}]},
            r"augment.train\[0\]: unknown transform 'HorizntalFlip'; did you mean",
        ),
        ({"overrides": {"Affine": {"rotation": 5}}}, r"Affine has no argument 'rotation'; did you mean rotate\?"),
        ({"overrides": {"ElasticTransform": {"p": 1}}}, r"preset default has no ElasticTransform"),
        ({"eval": [{"name": "Affine"}]}, r"augment.eval\[0\]: Affine moves or masks pixels"),
        ({"train": [{"name": "Normalize"}]}, r"Normalize cannot be used in a recipe: segflow adds it last"),
        ({"train": [{"name": "Rotate", "fill_mask": 0}]}, r"fill_mask would label the pixels it invents as class 0"),
        ({"train": [{"name": "Rotate", "mask_interpolation": 1}]}, r"mask_interpolation must be nearest"),
        ({"train": [{"name": "OneOf", "transforms": [{"name": "Blurr"}]}]}, r"transforms\[0\]: unknown transform"),
        ({"train": [{"name": "crop", "size": 3}]}, r"crop takes no arguments"),
        ({"preset": "medical"}, r"augment.preset: Input should be 'none', 'light'"),
        ({"hflip": 0.5}, r"augment.hflip was replaced by recipes: .* \{HorizontalFlip: \{p: 0.5\}\}"),
    ],
)
def test_invalid_recipes_fail_at_load_naming_the_transform(augment_section, message):
    with pytest.raises(ParamsError, match=message) as caught:
        parse_params({"augment": augment_section})
    assert "\n" not in str(caught.value)


def test_bad_argument_values_fail_when_built_naming_the_transform():
    params = AugmentParams(train=[{"name": "GaussianBlur", "blur_limit": "wide"}])
    with pytest.raises(SegflowError, match=r"augment \(preset default\): GaussianBlur: bad arguments"):
        augment.build_train_transform(params, seed=0)


def test_eval_pixel_transforms_reach_validation_and_prediction_alike():
    params = AugmentParams(eval=[{"name": "InvertImg", "p": 1.0}], normalize=IDENTITY)
    image = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64, 1) % 251
    validated = augment.build_eval_transform(params, channels=1)(image=image)["image"]
    card = ModelCard(
        arch="Unet",
        encoder="resnet18",
        encoder_depth=4,
        in_channels=1,
        classes=["a", "b"],
        mean=[0.0],
        std=[1.0],
        pad_divisor=32,
        train_size=64,
        pixel_transforms=list(params.eval),
    )
    predicted = Predictor(lambda x: x, card).prepare(image)
    assert np.allclose(validated[..., 0], 1 - image[..., 0] / 255)
    assert np.allclose(predicted[0], validated[..., 0], atol=1e-6)


def _corner(pipeline, seed: int) -> tuple[int, ...]:
    """Where the marked top-left quarter of a 64x64 mask ends up after ``pipeline`` seeded with ``seed``."""
    mask = np.zeros((64, 64), np.uint8)
    mask[:32, :32] = 1
    recipes.reseed(pipeline, seed)
    out = pipeline(image=np.zeros((64, 64, 3), np.uint8), mask=mask)["mask"]
    return tuple(int(out[y : y + 32, x : x + 32].mean() > 0.5) for y in (0, 32) for x in (0, 32))


def test_seeded_pipelines_draw_each_transform_independently_and_reproducibly():
    """albumentations 2.0 seeds every transform of a Compose alike, so flips of one p fire together and half
    the samples get no augmentation: reseed shares one stream, and the microscopy preset's two flips and its
    rotation then send the marked corner to each of the four corners about equally often."""
    import albumentations as A

    params = AugmentParams(preset="microscopy", crop_size=64)
    flips = [
        t
        for t in augment.build_train_transform(params, 0).transforms
        if type(t).__name__ in ("HorizontalFlip", "VerticalFlip", "RandomRotate90")
    ]
    assert [type(t).__name__ for t in flips] == ["HorizontalFlip", "VerticalFlip", "RandomRotate90"]
    pipeline = A.Compose(flips)
    seeds = np.random.default_rng(0).integers(0, 2**32, size=400)
    shares = np.mean([_corner(pipeline, int(s)) for s in seeds], axis=0)
    assert shares.sum() == pytest.approx(1.0)
    assert all(0.17 < share < 0.33 for share in shares), shares  # albumentations' own seeding: 0.5 top-left

    assert _corner(pipeline, 7) == _corner(pipeline, 7)  # the same seed, the same sample


def test_the_saved_training_pipeline_is_seeded_per_sample_with_independent_draws(tmp_path):
    import albumentations as A

    from segflow.layout import load_transform

    pipeline = augment.build_train_transform(AugmentParams(preset="default", crop_size=64), 0)
    A.save(pipeline, str(tmp_path / "train.json"))
    loaded = load_transform(tmp_path / "train.json", 3)
    generators = {id(t.py_random) for t in loaded.transforms}
    assert generators == {id(loaded.py_random)}, "every transform draws from the pipeline's one stream"
