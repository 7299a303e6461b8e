"""Stage ``augment``: the albumentations pipelines for training and evaluation.

Builds both ``Compose`` pipelines from params and saves them with ``A.save`` to
``${paths.augment}/train.json`` and ``eval.json``; training and evaluation load
exactly these files, so what DVC versions is what ran. Also renders
``preview.png``: training samples after augmentation, with their masks, as the
model will see them.
"""

from __future__ import annotations

import logging

import albumentations as A
import cv2
import numpy as np

from segflow import recipes, viz
from segflow.errors import SegflowError
from segflow.io import atomic_path, read_image, read_instances, read_mask, write_png
from segflow.layout import (
    AUGMENT_PREVIEW,
    EVAL_PIPELINE,
    TRAIN_PIPELINE,
    image_channels,
    load_transform,
    read_manifest,
    split_rows,
    spread,
)
from segflow.params import AugmentParams, Params, Paths

log = logging.getLogger(__name__)


def build_train_transform(params: AugmentParams, seed: int, channels: int = 3) -> A.Compose:
    """The training recipe (``augment.preset`` + ``overrides`` + ``train``) followed by normalisation.

    The recipe's ``crop`` step pads to ``crop_size`` and crops; geometric transforms
    move image and mask together (masks nearest-neighbour) and label the pixels they
    invent ``IGNORE_INDEX``, so they count towards no class.

    Args:
        channels: the images' channel count (1 or 3), for the normalisation.

    Raises:
        SegflowError: a transform refuses its arguments (names it and the problem).
    """
    mean, std = params.normalize.for_channels(channels)
    try:
        steps = recipes.build(recipes.with_crop(params.train_recipe()), params.crop_size)
    except ValueError as error:
        raise SegflowError(f"params.yaml: augment (preset {params.preset}): {error}") from None
    return recipes.reseed(A.Compose([*steps, A.Normalize(mean=mean, std=std)]), seed)


def build_eval_transform(params: AugmentParams, channels: int = 3) -> A.Compose:
    """Deterministic: ``augment.eval``'s pixel-level transforms, padding bottom/right to the stride, normalisation.

    Padding sits at the bottom-right so predictions crop back with ``[:H, :W]``; it reflects the image (what
    inference does too) and :class:`segflow.semantic.dataset.SegmentationDataset` ignores it in the mask.
    """
    mean, std = params.normalize.for_channels(channels)
    try:
        pixel = recipes.build(params.eval, None)
    except ValueError as error:
        raise SegflowError(f"params.yaml: augment.eval: {error}") from None
    pipeline = A.Compose(
        [
            *pixel,
            A.PadIfNeeded(
                min_height=None,
                min_width=None,
                pad_height_divisor=params.pad_divisor,
                pad_width_divisor=params.pad_divisor,
                position="top_left",
                # Reflected, as inference pads (segflow.semantic.infer); the dataset labels the padded
                # pixels IGNORE_INDEX, so they are never scored.
                border_mode=cv2.BORDER_REFLECT_101,
            ),
            A.Normalize(mean=mean, std=std),
        ]
    )
    return recipes.reseed(pipeline, 0)  # any random pixel transform in augment.eval is the same on every run


def denormalize(image: np.ndarray, params: AugmentParams) -> np.ndarray:
    """Undo ``Normalize`` for display.

    Args:
        image: (H, W, C) float32, normalised.

    Returns:
        (H, W, C) uint8.
    """
    mean, std = (np.asarray(v, dtype=np.float32) for v in params.normalize.for_channels(image.shape[-1]))
    return (np.clip(image * std + mean, 0, 1) * 255).round().astype(np.uint8)


def render_preview(
    samples: list[tuple[np.ndarray, np.ndarray]],
    transform: A.Compose,
    params: AugmentParams,
    classes: list[str],
    instances: bool = False,
) -> np.ndarray:
    """Show each sample before and after augmentation, each with its mask.

    Args:
        samples: (image (H, W, C) uint8, mask (H, W) uint8) pairs; with ``instances``, (H, W) uint16
            instance ids (each object drawn in its own colour, outlined).

    Returns:
        (H', W', 3) uint8 picture.
    """
    rows = []
    crop = params.crop_size
    original = A.Compose([A.PadIfNeeded(crop, crop, border_mode=cv2.BORDER_CONSTANT), A.CenterCrop(crop, crop)])
    for image, mask in samples:
        if instances:  # ids shifted past 255, the label the pipelines give invented pixels
            mask = np.where(mask > 0, mask.astype(np.int32) + 256, 0).astype(np.uint16)
        before = original(image=image, mask=mask)
        after = transform(image=image, mask=mask)
        if instances:
            masks = [np.where(m >= 256, m.astype(np.int32) - 256, 0) for m in (before["mask"], after["mask"])]
            shown = [viz.instance_colours(m) for m in masks]
        else:
            shown = [viz.colourize(m, len(classes)) for m in (before["mask"], after["mask"])]
        rows.append(
            [
                viz.as_rgb(before["image"]),
                shown[0],
                viz.as_rgb(denormalize(after["image"], params)),
                shown[1],
            ]
        )
    titles = ["image", "objects", "augmented", "augmented objects"] if instances else None
    return viz.grid(rows, classes, titles or ["image", "mask", "augmented", "augmented mask"])


def run(params: Params, paths: Paths) -> None:
    """Save both pipelines and the preview under ``paths.augment``."""
    cfg = params.augment
    manifest = read_manifest(paths.ingest)
    channels = image_channels(manifest)
    train = build_train_transform(cfg, params.seed, channels)
    paths.augment.mkdir(parents=True, exist_ok=True)
    for name, transform in ((TRAIN_PIPELINE, train), (EVAL_PIPELINE, build_eval_transform(cfg, channels))):
        with atomic_path(paths.augment / name) as tmp:
            A.save(transform, str(tmp), data_format="json")

    train_rows = split_rows(manifest, "train")
    chosen = train_rows.iloc[spread(len(train_rows), cfg.preview_samples)]  # across the split, not the first few
    objects = params.task == "instance"
    read = read_instances if objects else read_mask
    samples = [(read_image(paths.ingest / r.image), read(paths.ingest / r.mask)) for r in chosen.itertuples()]
    # The preview draws from its own copy so it never depends on, or shifts, training's random stream.
    pipeline = load_transform(paths.augment / TRAIN_PIPELINE, params.seed)
    preview = render_preview(samples, pipeline, cfg, params.classes, instances=objects)
    with atomic_path(paths.augment / AUGMENT_PREVIEW) as tmp:
        write_png(tmp, preview)
    log.info("pipelines %s, %s and %s written to %s", TRAIN_PIPELINE, EVAL_PIPELINE, AUGMENT_PREVIEW, paths.augment)
