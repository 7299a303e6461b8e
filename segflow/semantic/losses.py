"""Training losses from ``smp.losses`` (Dice, Focal, Lovasz) and torch's cross-entropy, alone or summed."""

from __future__ import annotations

import logging

import segmentation_models_pytorch as smp
import torch

from segflow.params import IGNORE_INDEX

log = logging.getLogger(__name__)


def build_loss(name: str) -> torch.nn.Module:
    """An ``smp.losses`` loss (or a sum of two) for multiclass logits; ignores ``IGNORE_INDEX``.

    The returned module maps logits (N, C, H, W) float32 and targets (N, H, W) int64 to a scalar.
    Cross-entropy is torch's: smp's SoftCrossEntropyLoss averages over ignored
    pixels too (as zeros), which would shrink the loss with the padded area.
    """
    mode = smp.losses.MULTICLASS_MODE
    parts = {
        "ce": lambda: torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX),
        "dice": lambda: smp.losses.DiceLoss(mode, ignore_index=IGNORE_INDEX),
        "focal": lambda: smp.losses.FocalLoss(mode, ignore_index=IGNORE_INDEX),
        "lovasz": lambda: smp.losses.LovaszLoss(mode, ignore_index=IGNORE_INDEX),
    }
    names = {"dice_ce": ("dice", "ce"), "focal_dice": ("focal", "dice")}.get(name, (name,))
    return _SumLoss([parts[n]() for n in names])


class _SumLoss(torch.nn.Module):
    def __init__(self, losses: list[torch.nn.Module]):
        super().__init__()
        self.losses = torch.nn.ModuleList(losses)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sum(loss(logits, targets) for loss in self.losses)
