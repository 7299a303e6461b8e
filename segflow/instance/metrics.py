"""COCO mask and box AP for predicted instances, plus object counts and pixel IoU/Dice.

pycocotools is the reference implementation; this module only feeds it in-memory
data and reads its arrays. Three of its habits are worked around here:

- ``summarize()`` reads the headline AP at ``maxDets=100`` whatever ``params.maxDets``
  holds (it prints -1 when 100 is not among them), so the summary is computed from
  ``eval['precision']``/``['recall']`` at the ``max_dets`` actually set. ``maxDets`` caps
  detections per image *and category* (after sorting by score).
- ``loadRes`` takes a result's area from its box when a box is present, so the mask
  evaluation is given results without boxes (area = mask pixels, as for the truth), and
  it fails on an empty result list, which is built by hand instead.
- Annotation id 0 means "unmatched" inside COCOeval, so ids are renumbered from 1, and
  image ids are mapped to ints (our ids are file stems).

Values COCO reports as -1 (no truth in that area range or class) are returned as None.
Importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

SEMANTIC_REDUCTION = (
    "per class: IoU/Dice from pixel counts summed over the whole split (micro over pixels), crowd pixels ignored; "
    "macro: unweighted mean over classes present in truth or prediction"
)


def encode_rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of one binary mask.

    Args:
        mask: (H, W) bool or integer array; nonzero is foreground.

    Returns:
        ``{"size": [H, W], "counts": str}`` (str counts, so the dict is JSON-serialisable).
    """
    # pycocotools walks pixels column by column: it needs Fortran-ordered uint8.
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask) != 0, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Binary mask of a compressed (str/bytes counts) or uncompressed (list of int counts) COCO RLE.

    Args:
        rle: ``{"size": [H, W], "counts": ...}``.
        height, width: the expected size; checked against ``rle["size"]`` when given.

    Returns:
        (H, W) uint8 array of 0/1.
    """
    h, w = (int(s) for s in rle["size"])
    if (height is not None and height != h) or (width is not None and width != w):
        raise ValueError(f"RLE size {[h, w]} does not match {[height, width]}")
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed: frPyObjects compresses it
        compressed = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:  # the C decoder wants bytes
        compressed = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return _decode(compressed)


def _decode(rle: dict) -> np.ndarray:
    # pycocotools' decoder trips numpy 2's `copy=False` DeprecationWarning on every call: not ours to fix.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(rle).astype(np.uint8)


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons (each a flat ``[x0, y0, x1, y1, ...]``) as pycocotools does.

    pycocotools puts pixel (x, y) on the square ``[x, x+1) x [y, y+1)``: a polygon with
    integer corners (x0, y0)-(x1, y1) covers columns x0..x1-1 and rows y0..y1-1, and an
    axis-aligned edge at a fractional coordinate snaps to the nearest grid line (2.4 -> 2, 2.6 -> 3).

    Returns:
        (H, W) uint8 array of 0/1, the union of all polygons.
    """
    if not polygons:
        return np.zeros((height, width), np.uint8)
    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    return _decode(mask_utils.merge(rles))


@dataclass
class ImageTruth:
    """One image's true instances.

    Attributes:
        id: the image's id (file stem).
        instances: (H, W) uint16 instance ids, 0 = background, 1..N = instances.
        classes: instance id -> class index (0-based into the object class list).
        crowd: instance ids that are crowd (COCO ``iscrowd``) ignore regions.
    """

    id: str
    instances: np.ndarray
    classes: dict[int, int]
    crowd: frozenset[int] = field(default_factory=frozenset)


@dataclass
class ImagePrediction:
    """One image's predicted instances.

    Attributes:
        id: the image's id (file stem).
        masks: (K, H, W) bool masks.
        classes: (K,) int class indices (0-based into the object class list).
        scores: (K,) float confidences.
    """

    id: str
    masks: np.ndarray
    classes: np.ndarray
    scores: np.ndarray


def coco_ground_truth(truths: list[ImageTruth], classes: list[str]) -> dict:
    """COCO ground-truth dict: image ids are the truths' ids, categories 1..C are ``classes`` in order."""
    images, annotations = [], []
    for truth in truths:
        images.append({"id": truth.id, "height": truth.instances.shape[0], "width": truth.instances.shape[1]})
        for iid in (int(i) for i in np.unique(truth.instances) if i):
            if not 0 <= truth.classes.get(iid, -1) < len(classes):
                raise ValueError(f"{truth.id}: instance {iid} has no class in 0..{len(classes) - 1}")
            rle = encode_rle(truth.instances == iid)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": truth.id,
                    "category_id": truth.classes[iid] + 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": int(iid in truth.crowd),
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_results(pred: ImagePrediction, category_ids: list[int]) -> list[dict]:
    """COCO results entries of one image's predictions (what ``segflow predict`` writes as JSON).

    Args:
        pred: the image's predictions.
        category_ids: the COCO category id of each class index.

    Returns:
        One ``{"image_id", "category_id", "segmentation", "score", "bbox"}`` per mask: compressed RLE
        with str counts, the mask's tight ``[x, y, w, h]`` box.
    """
    if not len(pred.masks) == len(pred.classes) == len(pred.scores):
        raise ValueError(f"{pred.id}: masks, classes and scores differ in length")
    if len(pred.classes) and not 0 <= int(np.min(pred.classes)) <= int(np.max(pred.classes)) < len(category_ids):
        raise ValueError(f"{pred.id}: class indices outside 0..{len(category_ids) - 1}")
    rles = [encode_rle(mask) for mask in pred.masks]
    return [
        {
            "image_id": pred.id,
            "category_id": int(category_ids[int(cls)]),
            "segmentation": rle,
            "score": float(score),
            "bbox": mask_utils.toBbox(rle).tolist(),
        }
        for rle, cls, score in zip(rles, pred.classes, pred.scores, strict=True)
    ]


def _mean(values: np.ndarray) -> float | None:
    """Mean over the entries COCO filled in (-1 marks "no truth here"); None when there are none."""
    kept = values[values > -1]
    return float(kept.mean()) if kept.size else None


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _run(dataset: dict, dets: list[dict], iou_type: str, max_dets: int) -> tuple[dict, dict]:
    """One COCOeval run: (summary, per-category AP) at ``max_dets``."""
    if iou_type == "segm":  # without a box, loadRes takes the area from the mask (as the truth's)
        dets = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
    else:  # a box result, as on COCO's bbox track
        boxes = [d.get("bbox") or mask_utils.toBbox(d["segmentation"]).tolist() for d in dets]
        dets = [
            {**{k: v for k, v in d.items() if k != "segmentation"}, "bbox": b} for d, b in zip(dets, boxes, strict=True)
        ]
    gt = _coco(dataset)
    # An empty list breaks loadRes (it peeks at the first entry): hand COCOeval an empty result set.
    ev = COCOeval(gt, gt.loadRes(dets) if dets else _coco({**dataset, "annotations": []}), iou_type)
    ev.params.maxDets = sorted({1, 10, max_dets})  # evaluate() sorts them anyway: index by value
    ev.evaluate()
    ev.accumulate()
    p, m = ev.params, ev.params.maxDets.index(max_dets)
    precision, recall = ev.eval["precision"][..., m], ev.eval["recall"][..., m]  # (T, R, K, A), (T, K, A)
    area = {label: i for i, label in enumerate(p.areaRngLbl)}
    t50, t75 = (int(np.flatnonzero(np.isclose(p.iouThrs, t))[0]) for t in (0.5, 0.75))
    every = precision[..., area["all"]]  # (T, R, K)
    summary = {
        "map": _mean(every),
        "map_50": _mean(every[t50]),
        "map_75": _mean(every[t75]),
        **{f"map_{a}": _mean(precision[..., area[a]]) for a in ("small", "medium", "large")},
        "mar": _mean(recall[..., area["all"]]),
    }
    per_cat = {cat: {"ap": _mean(every[:, :, k]), "ap_50": _mean(every[t50, :, k])} for k, cat in enumerate(p.catIds)}
    return summary, per_cat


def evaluate_json(gt_json: dict, results: list[dict], *, max_dets: int = 100) -> dict:
    """COCO mask and box AP of results against a COCO ground-truth dict (the core of ``evaluate``).

    Args:
        gt_json: COCO ground truth: ``images`` (id, height, width), ``categories`` (id, name) and
            ``annotations`` (image_id, category_id, segmentation, area, bbox, iscrowd); ids may be str.
        results: COCO results entries (``coco_results``); a missing ``bbox`` is the mask's box.
        max_dets: detections per image and category that count (COCO's ``maxDets[-1]``).

    Returns:
        ``{"segm": s, "bbox": s, "segm_per_class": {name: {"ap", "ap_50", "n_true"}}, "images": n}``,
        each ``s`` holding map, map_50, map_75, map_small, map_medium, map_large and mar (AR at max_dets).
    """
    if max_dets < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")
    index = {img["id"]: n for n, img in enumerate(gt_json["images"], 1)}

    def image(entry: dict) -> int:
        if entry["image_id"] not in index:
            raise ValueError(f"image {entry['image_id']!r} is not in the ground truth")
        return index[entry["image_id"]]

    # Shallow copies throughout: pycocotools writes into the dicts it is given.
    dataset = {
        "images": [{**img, "id": index[img["id"]]} for img in gt_json["images"]],
        "categories": [dict(c) for c in gt_json["categories"]],
        "annotations": [
            {**a, "id": n, "image_id": image(a), "iscrowd": int(a.get("iscrowd", 0))}
            for n, a in enumerate(gt_json.get("annotations", []), 1)
        ],
    }
    dets = [{**r, "image_id": image(r)} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        (segm, per_cat), (bbox, _) = [_run(dataset, dets, t, max_dets) for t in ("segm", "bbox")]
    n_true = Counter(a["category_id"] for a in dataset["annotations"] if not a["iscrowd"])
    per_class = {c["name"]: {**per_cat[c["id"]], "n_true": n_true[c["id"]]} for c in dataset["categories"]}
    return {"segm": segm, "bbox": bbox, "segm_per_class": per_class, "images": len(dataset["images"])}


def evaluate(
    truths: list[ImageTruth],
    preds: list[ImagePrediction],
    classes: list[str],
    *,
    max_dets: int = 100,
    count_threshold: float = 0.5,
) -> dict:
    """Score predicted instances against the truth: COCO mask/box AP, object counts, pixel IoU/Dice.

    Args:
        truths: one per image (an image without instances is fine).
        preds: at most one per truth, matched by id; a truth without one has no predictions.
        classes: object class names (class index i is COCO category i + 1); background not listed.
        max_dets: detections per image and category COCO AP counts (the default 100 caps crowded images).
        count_threshold: the score from which a prediction counts as an object (counts, semantic).

    Returns:
        JSON-ready ``{"segm", "bbox", "segm_per_class", "counts", "semantic", "images", "max_dets",
        "score_threshold"}`` (``evaluate_json`` plus counts and pixel scores); ``score_threshold`` is None:
        AP ranks all predictions. Values undefined for these data (-1 in COCO) are None.
    """
    by_id = {p.id: p for p in preds}
    if len(by_id) != len(preds) or len({t.id for t in truths}) != len(truths):
        raise ValueError("image ids must be unique")
    shapes = {t.id: t.instances.shape for t in truths}
    for p in preds:
        if p.id not in shapes or np.shape(p.masks)[1:] != shapes[p.id]:
            raise ValueError(f"{p.id}: no truth of the masks' size {np.shape(p.masks)[1:]}")
    results = [r for p in preds for r in coco_results(p, list(range(1, len(classes) + 1)))]
    out = evaluate_json(coco_ground_truth(truths, classes), results, max_dets=max_dets)

    per_image, stats = [], np.zeros((3, len(classes)), np.int64)  # tp, fp, fn pixels per class, whole split
    for truth in truths:
        pred = by_id.get(truth.id)
        kept = [] if pred is None else np.flatnonzero(np.asarray(pred.scores) >= count_threshold)
        n_true = sum(1 for i in np.unique(truth.instances) if i and int(i) not in truth.crowd)
        per_image.append({"id": truth.id, "true": n_true, "pred": len(kept)})
        stats += _pixel_stats(truth, pred, kept, len(classes))
    errors = [abs(r["pred"] - r["true"]) for r in per_image]
    out["counts"] = {
        "true_total": sum(r["true"] for r in per_image),
        "pred_total": sum(r["pred"] for r in per_image),
        "mean_abs_count_error": float(np.mean(errors)) if errors else None,
        "score_threshold": count_threshold,
        "per_image": per_image,
    }
    out["semantic"] = {**_semantic(stats, classes), "reduction": SEMANTIC_REDUCTION, "score_threshold": count_threshold}
    out["max_dets"], out["score_threshold"] = max_dets, None
    return out


def _pixel_stats(truth: ImageTruth, pred: ImagePrediction | None, kept, n_classes: int) -> np.ndarray:
    """(3, C) tp/fp/fn pixel counts of one image's class maps; crowd pixels count nowhere."""
    lookup = np.full(int(truth.instances.max(initial=0)) + 1, -1, np.int64)  # instance id -> class, -1: none
    for iid, cls in truth.classes.items():
        if 0 < iid < len(lookup):
            lookup[iid] = cls
    true_map = lookup[truth.instances]
    valid = ~np.isin(truth.instances, list(truth.crowd))
    pred_map = np.full(truth.instances.shape, -1, np.int64)
    if pred is not None:
        for k in sorted(kept, key=lambda k: pred.scores[k]):  # ascending: the highest score is painted last, wins
            pred_map[np.asarray(pred.masks[k], bool)] = int(pred.classes[k])
    out = np.zeros((3, n_classes), np.int64)
    for c in range(n_classes):
        t, p = (true_map == c) & valid, (pred_map == c) & valid
        out[:, c] = (t & p).sum(), (p & ~t).sum(), (t & ~p).sum()
    return out


def _semantic(stats: np.ndarray, classes: list[str]) -> dict:
    tp, fp, fn = stats.astype(float)
    with np.errstate(invalid="ignore"):  # 0/0: a class in neither truth nor prediction is undefined, not 1.0
        iou, dice = tp / (tp + fp + fn), 2 * tp / (2 * tp + fp + fn)

    def named(v: np.ndarray) -> dict:
        return {name: None if np.isnan(x) else float(x) for name, x in zip(classes, v, strict=True)}

    def macro(v: np.ndarray) -> float | None:
        return None if np.isnan(v).all() else float(np.nanmean(v))

    return {"iou_macro": macro(iou), "dice_macro": macro(dice), "iou": named(iou), "dice": named(dice)}
