"""Training losses from ``smp.losses`` (Dice, Focal, Lovasz) and torch's cross-entropy, alone or summed;
class weights for them (given, or median frequency balancing)."""

from __future__ import annotations

import logging

import numpy as np
import segmentation_models_pytorch as smp
import torch

from segflow.errors import SegflowError
from segflow.params import IGNORE_INDEX

log = logging.getLogger(__name__)


def build_loss(name: str, class_weights: list[float] | None = None) -> torch.nn.Module:
    """An ``smp.losses`` loss (or a sum of two) for multiclass logits; ignores ``IGNORE_INDEX``.

    The returned module maps logits (N, C, H, W) float32 and targets (N, H, W) int64 to a scalar.
    Cross-entropy is torch's: smp's SoftCrossEntropyLoss averages over ignored
    pixels too (as zeros), which would shrink the loss with the padded area.

    Args:
        class_weights: one weight per class (None: unweighted, the same module as before weights existed).
            They weight the cross-entropy term (torch's weighted mean: each pixel counts with the weight of
            its true class, divided by the sum of those weights) or the focal term (smp's: the per-class
            one-vs-rest focal losses averaged with these weights). Dice and Lovasz terms stay unweighted
            (each already averages over classes, a small class counting as much as a large one), so in
            ``dice_ce`` / ``focal_dice`` only the CE / focal part is weighted; ``dice`` and ``lovasz`` alone have
            no term to weight, and ``train.class_weights`` is refused with them (TrainParams).
    """
    mode = smp.losses.MULTICLASS_MODE
    weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
    if class_weights is not None and name in ("dice", "lovasz"):
        raise SegflowError(f"train.loss {name} has no cross-entropy or focal term for train.class_weights to weight")
    parts = {
        "ce": lambda: torch.nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX),
        "dice": lambda: smp.losses.DiceLoss(mode, ignore_index=IGNORE_INDEX),
        "focal": lambda: smp.losses.FocalLoss(mode, ignore_index=IGNORE_INDEX, class_weights=class_weights),
        "lovasz": lambda: smp.losses.LovaszLoss(mode, ignore_index=IGNORE_INDEX),
    }
    names = {"dice_ce": ("dice", "ce"), "focal_dice": ("focal", "dice")}.get(name, (name,))
    return _SumLoss([parts[n]() for n in names])


def median_frequency(pixels: np.ndarray, classes: list[str]) -> list[float]:
    """Median frequency balancing (Eigen & Fergus 2015; SegNet's CamVid weights): ``median(freq) / freq(c)``.

    ``freq(c)`` is the pixels of class c over the labelled pixels of the images in which c is present
    (ignored pixels, label 255, count in neither), so a class that is large where it appears gets a small
    weight even when it appears in few images; the class at the median gets 1.

    Args:
        pixels: (images, classes) labelled pixels per class of each training image (ingest's ``px_<class>``).
        classes: the class names, for the error.

    Raises:
        SegflowError: a class has no pixels in these images: its frequency, and so its weight, is undefined
            (and a model trained without one example of it cannot learn it).
    """
    pixels = np.asarray(pixels, dtype=np.float64)
    class_pixels = pixels.sum(axis=0)
    absent = [name for name, count in zip(classes, class_pixels, strict=True) if count == 0]
    if absent:
        raise SegflowError(
            f"train.class_weights: median_frequency: {', '.join(absent)} {'has' if len(absent) == 1 else 'have'} "
            "no pixels in the training split, so no frequency to weight by; get images with "
            f"{'it' if len(absent) == 1 else 'them'} into the train split, or give train.class_weights as a list "
            "(one weight per class)"
        )
    image_pixels = ((pixels > 0) * pixels.sum(axis=1, keepdims=True)).sum(axis=0)
    frequency = class_pixels / image_pixels
    median = float(np.median(frequency))
    return [median / float(f) for f in frequency]


class _SumLoss(torch.nn.Module):
    def __init__(self, losses: list[torch.nn.Module]):
        super().__init__()
        self.losses = torch.nn.ModuleList(losses)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sum(loss(logits, targets) for loss in self.losses)
