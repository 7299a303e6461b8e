"""Stage ``evaluate`` for ``task: instance``: COCO mask and box AP, counts and pixel IoU/Dice on the test split.

Runs the saved model (with its own preprocessing, the predictor ``segflow predict`` uses) on every test
image and writes ``${paths.evaluate}/`` with the semantic family's file names, so the registry, the gate,
``dvc metrics`` and ``dvc plots`` work unchanged:

- ``metrics.json``: headline numbers only: ``segm`` (map, map_50, map_75), ``bbox.map``, ``iou.macro``,
  ``dice.macro`` (from the instance masks, comparable with a semantic model's) and ``count.mae``;
- ``scores.json``: everything (COCO AP per area range and category, counts per image, the split's digest
  and the reductions named); ``per_class.csv``: AP, AP50 and pixel IoU per category;
- ``per_image.csv``: true and predicted objects per image, worst count first;
- ``predictions.png``: test images with true and predicted objects (each its own colour, outlined);
- ``confusion.png``: true category (rows) against the category of the prediction matched to it at mask IoU
  0.5 (``none``: missed objects, or predictions that match nothing);
- ``speed.json``: parameters and inference images/s.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd

from segflow import progress, viz
from segflow.instance import metrics as scoring
from segflow.instance.dataset import objects_by_image
from segflow.instance.infer import Instances, Predictor
from segflow.io import atomic_path, read_image, read_instances, write_png, write_text
from segflow.layout import (
    CONFUSION,
    METRICS,
    MODEL_DIR,
    PER_CLASS,
    PER_IMAGE,
    PREDICTIONS,
    SCORES,
    SPEED,
    read_instance_table,
    read_manifest,
    split_digest,
    split_rows,
    spread,
)
from segflow.params import InstanceParams, Paths

log = logging.getLogger(__name__)


def truth_of(image_id: str, instances: np.ndarray, objects: dict[int, tuple[int, bool]]) -> scoring.ImageTruth:
    """The scorer's truth for one stored image (crowd regions kept as COCO ignore regions)."""
    present = {int(i) for i in np.unique(instances) if i}
    classes = {i: objects[i][0] for i in present if i in objects}
    crowd = frozenset(i for i in classes if objects[i][1])
    return scoring.ImageTruth(image_id, instances, classes, crowd)


def matched_confusion(truths, preds, num_classes: int, threshold: float, iou: float = 0.5) -> np.ndarray:
    """(C + 1, C + 1) counts: true category x matched predicted category; index C is ``none``.

    Each prediction scoring at least ``threshold``, best first, takes the unmatched non-crowd true object
    it overlaps most (mask IoU >= ``iou``), whatever the categories: a wrong category is a confusion,
    no match at all a miss (column none) or a false detection (row none).
    """
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for truth, pred in zip(truths, preds, strict=True):
        ids = [i for i in truth.classes if i not in truth.crowd]
        true_masks = [truth.instances == i for i in ids]
        taken = set()
        for k in np.argsort(-pred.scores, kind="stable"):
            if pred.scores[k] < threshold:
                continue
            best, best_iou = None, iou
            found = pred.masks[k]
            for n, mask in enumerate(true_masks):
                if n in taken:
                    continue
                union = np.logical_or(mask, found).sum()
                value = np.logical_and(mask, found).sum() / union if union else 0.0
                if value >= best_iou:
                    best, best_iou = n, value
            if best is None:
                matrix[num_classes, pred.classes[k]] += 1
            else:
                taken.add(best)
                matrix[truth.classes[ids[best]], pred.classes[k]] += 1
        for n, i in enumerate(ids):
            if n not in taken:
                matrix[truth.classes[i], num_classes] += 1
    return matrix


def headline(scores: dict) -> dict:
    """metrics.json: a few numbers (``dvc metrics show`` fits a terminal)."""
    return {
        "images": scores["images"],
        "segm": {k: scores["segm"][k] for k in ("map", "map_50", "map_75")},
        "bbox": {"map": scores["bbox"]["map"]},
        "iou": {"macro": scores["semantic"]["iou_macro"]},
        "dice": {"macro": scores["semantic"]["dice_macro"]},
        "count": {"mae": scores["counts"]["mean_abs_count_error"]},
    }


def render(kept: list[tuple[np.ndarray, np.ndarray, Instances]], threshold: float, classes: list[str]) -> np.ndarray:
    rows = [
        [viz.as_rgb(image), viz.instance_colours(truth), viz.instance_colours(found.id_image(threshold))]
        for image, truth, found in kept
    ]
    return viz.grid(rows, classes, ["image", "true objects", "predicted objects"])


def test_scores(predictor: Predictor, params: InstanceParams, paths: Paths, keep: int = 0) -> tuple[dict, list, list]:
    """Score ``predictor`` on the test split: (scores as scores.json holds them, the ``keep`` images spread
    over the split with truth and prediction for the picture, inference seconds per image)."""
    cfg, inference = params.evaluate, params.predict
    classes = predictor.classes
    manifest = read_manifest(paths.ingest)
    rows = split_rows(manifest, "test")
    objects = objects_by_image(read_instance_table(paths.ingest), classes)
    show = set(spread(len(rows), keep)) if keep else set()
    truths, preds, kept, seconds = [], [], [], []
    for n, row in enumerate(progress.logged(rows.itertuples(), len(rows), "evaluate: test split", log)):
        image, instances = read_image(paths.ingest / row.image), read_instances(paths.ingest / row.mask)
        began = time.perf_counter()
        found = predictor.predict(image)
        seconds.append(time.perf_counter() - began)
        truths.append(truth_of(row.id, instances, objects.get(row.id, {})))
        preds.append(found.as_prediction(row.id))
        if n in show:
            kept.append((image, instances, found))
    scores = scoring.evaluate(
        truths, preds, classes, max_dets=inference.max_detections, count_threshold=cfg.count_threshold
    )
    scores |= {"split": "test", "split_sha256": split_digest(paths.ingest, rows), "images": len(rows)}
    # The pixel scores under the names the semantic family (and the registry card) use.
    semantic = scores["semantic"]
    scores["iou"] = {"macro": semantic["iou_macro"], "per_class": semantic["iou"]}
    scores["dice"] = {"macro": semantic["dice_macro"], "per_class": semantic["dice"]}
    scores["reduction"] = semantic["reduction"]
    # AP per category beside the headline (register.metric: segm.per_class.<category> works too).
    scores["segm"]["per_class"] = {c: v["ap"] for c, v in scores["segm_per_class"].items()}
    scores["confusion"] = {
        "labels": [*classes, "none"],
        "counts": matched_confusion(truths, preds, len(classes), cfg.count_threshold).tolist(),
        "note": "rows: true category (none: a prediction matching no object), columns: the matched prediction's "
        "category (none: a missed object); matched at mask IoU >= 0.5, predictions scoring >= count_threshold",
    }
    return scores, kept, seconds


def predictor_for(model_dir, params: InstanceParams) -> Predictor:
    """The predictor evaluate and ``segflow predict`` use, with params' inference settings."""
    inference = params.predict
    return Predictor(
        model_dir,
        inference.max_detections,
        inference.score_threshold,
        inference.mask_threshold,
        tile_size=inference.tile_size,
        overlap=inference.overlap,
        merge_iou=inference.merge_iou,
    )


def score_model(model_dir, params: InstanceParams, paths: Paths) -> dict:
    """The scores evaluate would write for the model in ``model_dir`` on the current test split (the
    registry's re-scoring of a champion when the split changed)."""
    return test_scores(predictor_for(model_dir, params), params, paths)[0]


def run(params: InstanceParams, paths: Paths) -> dict:
    """Evaluate the instance model on the test split; write metrics, tables and pictures.

    Returns:
        The full scores (``scores.json``).
    """
    cfg = params.evaluate
    predictor = predictor_for(paths.train / MODEL_DIR, params)
    classes = predictor.classes
    scores, kept, seconds = test_scores(predictor, params, paths, keep=cfg.preview_samples)
    rows = scores["images"]
    paths.evaluate.mkdir(parents=True, exist_ok=True)
    per_class = pd.DataFrame(
        {
            "class": classes,
            "ap": [scores["segm_per_class"][c]["ap"] for c in classes],
            "ap_50": [scores["segm_per_class"][c]["ap_50"] for c in classes],
            "iou": [scores["semantic"]["iou"].get(c) for c in classes],
        }
    )
    per_image = pd.DataFrame(scores["counts"]["per_image"])
    per_image["error"] = per_image["pred"] - per_image["true"]
    per_image = per_image.reindex(per_image["error"].abs().sort_values(ascending=False, kind="stable").index)
    for name, table in ((PER_CLASS, per_class), (PER_IMAGE, per_image)):
        with atomic_path(paths.evaluate / name) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6f")
    with atomic_path(paths.evaluate / PREDICTIONS) as tmp:
        write_png(tmp, render(kept, cfg.count_threshold, classes))
    with atomic_path(paths.evaluate / CONFUSION) as tmp:
        write_png(tmp, viz.confusion(np.asarray(scores["confusion"]["counts"]), [*classes, "none"]))
    total = sum(seconds)
    speed = {
        "model": {"parameters": sum(p.numel() for p in predictor.model.parameters())},
        "inference": {"images": len(seconds), "images_per_s": round(len(seconds) / total, 3) if total else None},
    }
    write_text(paths.evaluate / SPEED, json.dumps(speed, indent=2) + "\n")
    write_text(paths.evaluate / SCORES, json.dumps(scores, indent=2) + "\n")
    write_text(paths.evaluate / METRICS, json.dumps(headline(scores), indent=2) + "\n")
    log.info(
        "test mask AP %.4f (AP50 %.4f), box AP %.4f, objects %d true / %d predicted (count error %.2f per image), "
        "IoU macro %s on %d images",
        scores["segm"]["map"],
        scores["segm"]["map_50"],
        scores["bbox"]["map"],
        scores["counts"]["true_total"],
        scores["counts"]["pred_total"],
        scores["counts"]["mean_abs_count_error"],
        scores["semantic"]["iou_macro"],
        rows,
    )
    return scores
