"""IoU and Dice from confusion counts, with the reduction spelled out.

Counts come from ``smp.metrics.get_stats`` (one row per image, one column per
class). Scores:

- ``per_class``: each class's IoU/Dice from its pixel counts summed over all
  images (a dataset-level score per class).
- ``macro``: the unweighted mean of ``per_class`` over the classes that occur
  in the ground truth or the prediction; a class absent from both is
  undefined (null), not a free 1.0.
- ``macro_foreground``: the same mean without the class params.yaml names
  ``background`` (with ``background: null`` every class is foreground, and
  it equals ``macro``); never "whatever class comes first".
- ``micro``: one IoU/Dice from all classes' counts pooled. With one label
  per pixel every false positive of one class is a false negative of another,
  so micro Dice equals pixel accuracy (kept because readers expect the name).

Dice is F1 on pixel counts (``smp.metrics.f1_score``).
"""

from __future__ import annotations

import math

import segmentation_models_pytorch as smp
import torch

from segflow.params import IGNORE_INDEX

REDUCTION = (
    "per_class: IoU/Dice of each class from pixel counts summed over all images; "
    "macro: unweighted mean of per_class over classes present in ground truth or prediction; "
    "macro_foreground: macro without the class named `background` in params.yaml (all classes when null); "
    "micro: all classes' pixel counts pooled (micro Dice = pixel accuracy for single-label masks)"
)


def confusion_counts(
    preds: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image, per-class tp/fp/fn/tn; pixels labelled ``IGNORE_INDEX`` count nowhere.

    Args:
        preds: (N, H, W) int64 predicted class ids.
        targets: (N, H, W) int64 true class ids (or ``IGNORE_INDEX``).

    Returns:
        tp, fp, fn, tn, each (N, C) int64.
    """
    return smp.metrics.get_stats(
        preds.long(), targets.long(), mode="multiclass", num_classes=num_classes, ignore_index=IGNORE_INDEX
    )


def _scores(metric, tp, fp, fn, tn) -> torch.Tensor:
    """Per-class score from counts; NaN where the class is in neither truth nor prediction."""
    return metric(tp, fp, fn, tn, reduction="none", zero_division=math.nan)


def _clean(value: float | torch.Tensor) -> float | None:
    """A JSON-ready score: rounded, None where undefined (NaN)."""
    value = float(value)
    return None if math.isnan(value) else round(value, 6)


def summarize(
    tp: torch.Tensor,
    fp: torch.Tensor,
    fn: torch.Tensor,
    tn: torch.Tensor,
    classes: list[str],
    background: str | None = None,
) -> dict:
    """IoU and Dice at every reduction, as a JSON-ready dict.

    Args:
        tp, fp, fn, tn: (N, C) int64 counts from :func:`confusion_counts`.
        classes: C class names.
        background: the class left out of ``macro_foreground`` (None: none is).
    """
    foreground = torch.tensor([name != background for name in classes])
    totals = [t.sum(0) for t in (tp, fp, fn, tn)]
    pooled = [t.sum() for t in totals]
    result = {}
    for name, metric in (("iou", smp.metrics.iou_score), ("dice", smp.metrics.f1_score)):
        per_class = _scores(metric, *totals)
        result[name] = {
            # nanmean of an all-NaN tensor is NaN, which _clean turns into None.
            "macro": _clean(per_class.nanmean()),
            "macro_foreground": _clean(per_class[foreground].nanmean()),
            "micro": _clean(_scores(metric, *pooled)),
            "per_class": {c: _clean(v) for c, v in zip(classes, per_class.tolist(), strict=True)},
        }
    labelled = int((totals[0] + totals[2]).sum())
    result["pixel_accuracy"] = round(int(totals[0].sum()) / labelled, 6) if labelled else None
    return result


def per_image_iou(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, tn: torch.Tensor) -> torch.Tensor:
    """Each image's own per-class IoU (NaN where a class is in neither truth nor prediction).

    Returns:
        (N, C) float32.
    """
    return _scores(smp.metrics.iou_score, tp, fp, fn, tn)
