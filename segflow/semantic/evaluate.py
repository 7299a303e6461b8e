"""Stage ``evaluate``: score the trained model on the test split.

Runs the saved model (``${paths.train}/model``, with its own preprocessing) on
every test image at full size and writes ``${paths.evaluate}/``:

- ``metrics.json``: the headline scores, numbers only (IoU and Dice macro,
  foreground, micro; pixel accuracy), for ``dvc metrics show`` / ``diff``;
- ``scores.json``: everything they are drawn from: per class, the split, the
  reductions spelled out (see :mod:`segflow.semantic.metrics`);
- ``per_class.csv``: the same per-class numbers as a table (a bar plot);
- ``per_image.csv``: each test image's own IoU per class, worst first;
- ``predictions.png``: test images with truth, prediction and errors;
- ``speed.json``: parameters, multiply-accumulates at the training size and
  inference images/s (timings: they change from run to run, the scores do not).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from segflow import progress, viz
from segflow.io import atomic_path, write_png, write_text
from segflow.layout import (
    CONFUSION,
    METRICS,
    MODEL_DIR,
    PER_CLASS,
    PER_IMAGE,
    PREDICTIONS,
    SCORES,
    SPEED,
    headline_metrics,
    read_manifest,
    split_digest,
    split_rows,
    spread,
)
from segflow.params import IGNORE_INDEX, Params, Paths
from segflow.semantic import infer, measure, store
from segflow.semantic import metrics as scoring
from segflow.semantic.card import ModelCard
from segflow.semantic.dataset import SegmentationDataset

log = logging.getLogger(__name__)


def predict(predictor: infer.Predictor, dataset: SegmentationDataset, seconds: list[float] | None = None):
    """Yield ``(dataset index, image, mask, prediction)`` per test image, each image decoded once.

    The same inference as ``segflow predict``: whole images, or tiles above ``predict.tile_size``.
    Consecutive whole images of one size go through the model together, ``predict.batch_size`` at a
    time (a model in eval mode scores each image of a batch as it would alone); tiled images one by one.

    Args:
        seconds: if given, each image's inference time (decoded image in, class ids out) is appended;
            an image predicted in a batch gets its share of the batch's time.

    Yields:
        The prediction is (H, W) int64 class ids at full size.
    """
    pending: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, float]] = []

    def flush():
        if not pending:
            return
        started = time.perf_counter()
        out = predictor.forward(np.stack([x for *_, x, _ in pending]))
        preds = [
            logits[:, : image.shape[0], : image.shape[1]].argmax(0)
            for logits, (_, image, *_) in zip(out, pending, strict=True)
        ]
        share = (time.perf_counter() - started) / len(pending)
        for (index, image, mask, _, prepared), pred in zip(pending, preds, strict=True):
            if seconds is not None:
                seconds.append(prepared + share)
            yield index, image, mask, torch.from_numpy(pred.astype(np.int64))
        pending.clear()

    for index in range(len(dataset)):
        image, mask = dataset.load(index)
        started = time.perf_counter()
        d = predictor.card.pad_divisor
        if -(-max(image.shape[:2]) // d) * d > predictor.tile_size:  # tiled: on its own, as segflow predict does
            yield from flush()
            pred = predictor.predict(image)
            if seconds is not None:
                seconds.append(time.perf_counter() - started)
            yield index, image, mask, torch.from_numpy(pred.astype(np.int64))
            continue
        x = predictor.prepare(image)
        if pending and pending[0][3].shape != x.shape:
            yield from flush()
        pending.append((index, image, mask, x, time.perf_counter() - started))
        if len(pending) >= predictor.batch_size:
            yield from flush()
    yield from flush()


def speed(seconds: list[float], model: torch.nn.Module, card: ModelCard) -> dict:
    """What the model costs: size, multiply-accumulates at the training size, and inference images/s.

    The first image is left out of the rate when there are others (one-off warm-up of the kernels).
    """
    timed = seconds[1:] or seconds
    return {
        "model": measure.size(model, card.in_channels, card.train_size),
        "inference": {
            "images_per_s": round(len(timed) / sum(timed), 3) if timed and sum(timed) else None,
            "images": len(seconds),
            "device": measure.device_of(model).type,
            "threads": torch.get_num_threads(),
        },
    }


def score(
    dataset: SegmentationDataset, predictions, classes: list[str], keep: int = 0, background: str | None = None
) -> tuple[dict, pd.DataFrame, dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Compare each prediction, cropped to its image, with the untouched mask on disk.

    Args:
        predictions: ``(index, image, mask, (H', W') int64)``, the prediction maybe padded at the bottom/right.
        keep: also return image, mask and cropped prediction of this many test images, spread over the split
            (for pictures).

    Returns:
        metrics summary, per-image table (worst first), and the kept (image, mask, prediction) by index.
    """
    counts, ids, kept = [], [], {}
    shown = set(spread(len(dataset), keep))
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for index, image, mask, pred in predictions:
        h, w = mask.shape
        pred = pred[:h, :w]
        counts.append(scoring.confusion_counts(pred[None], torch.from_numpy(mask.astype(np.int64))[None], len(classes)))
        ids.append(dataset.rows.loc[index, "id"])
        matrix += confusion_matrix(mask, pred.numpy(), len(classes))
        if index in shown:
            kept[index] = (image, mask, pred.numpy().astype(np.uint8))
    tp, fp, fn, tn = (torch.cat(parts) for parts in zip(*counts, strict=True))
    per_image = pd.DataFrame(scoring.per_image_iou(tp, fp, fn, tn).numpy(), columns=[f"iou_{c}" for c in classes])
    per_image.insert(0, "id", ids)
    per_image["iou_macro"] = per_image[[f"iou_{c}" for c in classes]].mean(axis=1, skipna=True)
    summary = scoring.summarize(tp, fp, fn, tn, classes, background)
    summary["confusion"] = {"counts": matrix.tolist(), "most_confused": most_confused(matrix, classes)}
    return summary, per_image.sort_values("iou_macro"), kept


def confusion_matrix(mask: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel counts of (true class, predicted class) over the labelled pixels (255 left out): (K, K) int64."""
    labelled = mask != IGNORE_INDEX
    pairs = mask[labelled].astype(np.int64) * num_classes + pred[labelled].astype(np.int64)
    return np.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def most_confused(matrix: np.ndarray, classes: list[str], top: int = 3) -> list[dict]:
    """The largest mistakes by share of the true class's pixels: ``[{"true", "predicted", "share"}]``."""
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    np.fill_diagonal(shares, 0.0)
    order = np.argsort(shares, axis=None)[::-1][:top]
    found = []
    for flat in order:
        i, j = divmod(int(flat), len(classes))
        if shares[i, j] > 0:
            found.append({"true": classes[i], "predicted": classes[j], "share": round(float(shares[i, j]), 6)})
    return found


def render_predictions(kept: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], classes: list[str]) -> np.ndarray:
    """Image, truth, prediction and an error map (red = wrong) for each kept (image, mask, prediction)."""
    rows = []
    for index in sorted(kept):
        image, mask, pred = kept[index]
        image = viz.as_rgb(image)
        errors = np.where(((pred != mask) & (mask != IGNORE_INDEX))[..., None], (255, 40, 40), (image // 3)).astype(
            np.uint8
        )
        rows.append([image, viz.colourize(mask, len(classes)), viz.colourize(pred, len(classes)), errors])
    return viz.grid(rows, classes, ["image", "truth", "prediction", "errors"])


def test_scores(
    model: torch.nn.Module, card: ModelCard, params: Params, paths: Paths, *, keep: int = 0, seconds=None
) -> tuple[dict, pd.DataFrame, dict[int, np.ndarray], SegmentationDataset]:
    """Score a model on the test split of ``paths.ingest``: what the evaluate stage writes to metrics.json.

    The one evaluator: the stage, and the registry's gate when it re-scores a champion on a candidate's
    split, both call this (same inference as ``segflow predict``, same reductions).

    Args:
        keep: also return the predictions of ``keep`` test images spread over the split (for pictures).
        seconds: if given, each image's inference time is appended.

    Returns:
        (metrics, per-image table, kept predictions, the test dataset).
    """
    rows = split_rows(read_manifest(paths.ingest), "test")
    dataset = SegmentationDataset(paths.ingest, rows, transform=None)
    settings = params.predict
    predictor = infer.Predictor(
        infer.torch_forward(model), card, settings.tile_size, settings.overlap, settings.batch_size
    )
    background = params.background if params.background in card.classes else None
    predictions = progress.logged(predict(predictor, dataset, seconds), len(dataset), "evaluate: test split", log)
    summary, per_image, kept = score(dataset, predictions, card.classes, keep=keep, background=background)
    metrics = {
        "split": "test",
        "split_sha256": split_digest(paths.ingest, rows),
        "images": len(rows),
        "background": background,
        "reduction": scoring.REDUCTION,
        **summary,
    }
    return metrics, per_image, kept, dataset


def score_model(model_dir: Path, params: Params, paths: Paths) -> dict:
    """The metrics.json the evaluate stage would write for the model in ``model_dir`` on this test split.

    Raises:
        SegflowError: the model folder fails its checks (see :func:`segflow.semantic.store.load`).
    """
    model, card = store.load(model_dir)
    return test_scores(model, card, params, paths)[0]


def run(params: Params, paths: Paths) -> dict:
    """Evaluate the model on the test split; write metrics, tables and the preview.

    Returns:
        The metrics written to ``metrics.json``.
    """
    model_dir = paths.train / MODEL_DIR
    model, card = store.load(model_dir)
    if card.classes != params.classes:
        log.warning(
            "model classes %s differ from params classes %s; scoring by the model's", card.classes, params.classes
        )
    seconds: list[float] = []
    metrics, per_image, kept, _ = test_scores(
        model, card, params, paths, keep=params.evaluate.preview_samples, seconds=seconds
    )
    summary = metrics

    paths.evaluate.mkdir(parents=True, exist_ok=True)
    per_class = pd.DataFrame(
        {
            "class": card.classes,
            "iou": [summary["iou"]["per_class"][c] for c in card.classes],
            "dice": [summary["dice"]["per_class"][c] for c in card.classes],
        }
    )
    for name, table in ((PER_CLASS, per_class), (PER_IMAGE, per_image)):
        with atomic_path(paths.evaluate / name) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6f")
    with atomic_path(paths.evaluate / PREDICTIONS) as tmp:
        write_png(tmp, render_predictions(kept, card.classes))
    with atomic_path(paths.evaluate / CONFUSION) as tmp:
        write_png(tmp, viz.confusion(np.asarray(summary["confusion"]["counts"]), card.classes))
    # Timings change from run to run, so they are kept apart from the scores (metrics.json stays reproducible).
    write_text(paths.evaluate / SPEED, json.dumps(speed(seconds, model, card), indent=2) + "\n")
    write_text(paths.evaluate / SCORES, json.dumps(metrics, indent=2) + "\n")
    # Last, so a metrics.json never sits beside tables from an older run.
    write_text(paths.evaluate / METRICS, json.dumps(headline_metrics(metrics), indent=2) + "\n")
    log.info(
        "test IoU macro %s (foreground %s), Dice macro %s on %d images",
        summary["iou"]["macro"],
        summary["iou"]["macro_foreground"],
        summary["dice"]["macro"],
        metrics["images"],
    )
    if summary["confusion"]["most_confused"]:
        log.info("most confused: %s", confused_words(summary["confusion"]["most_confused"]))
    return metrics


def confused_words(mistakes: list[dict]) -> str:
    """``triangle as box (12.3 % of triangle pixels), ...``"""
    return ", ".join(
        f"{m['true']} as {m['predicted']} ({100 * m['share']:.1f} % of {m['true']} pixels)" for m in mistakes
    )
