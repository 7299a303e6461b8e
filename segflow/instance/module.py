"""The LightningModule that trains Mask R-CNN: torchvision's summed losses, validation mask AP.

torchvision's detection models return their losses only in training mode and detections only in
eval mode, so validation scores COCO mask AP (torchmetrics' ``MeanAveragePrecision``) and has no
loss. The loss watch, optimiser, schedule and checkpointed random state are shared
(:class:`segflow.training.module.TrainingModule`).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torchmetrics.detection import MeanAveragePrecision

from segflow.params import InstanceTrainParams
from segflow.training.module import TrainingModule

log = logging.getLogger(__name__)


class InstanceModule(TrainingModule):
    """Lightning wrapper around a torchvision Mask R-CNN.

    Args:
        model: the detection model (its own transform resizes and normalises nothing: see
            :func:`segflow.instance.model.build`).
        mask_threshold: a detection's soft mask becomes its mask above this (validation AP).
    """

    def __init__(self, model: torch.nn.Module, params: InstanceTrainParams, classes: list[str], mask_threshold: float):
        super().__init__()
        self.model = model
        self.cfg = params
        self.classes = classes
        self.mask_threshold = mask_threshold
        self.channels_last = False
        self.compiled = False
        self.reset_watch()
        self._map: MeanAveragePrecision | None = None

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, targets, _ = batch
        targets = [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets]
        terms = self.model(images, targets)
        loss = sum(terms.values())
        self._count(loss, batch_idx)
        sync = self.trainer.world_size > 1
        self.log(
            "train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(images), sync_dist=sync
        )
        for name, value in terms.items():  # loss_classifier, loss_box_reg, loss_mask, loss_objectness, loss_rpn_box_reg
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=len(images), sync_dist=sync)
        return loss

    def on_validation_epoch_start(self) -> None:
        # Ranked over every kept detection (as COCO does), masks thresholded; summed over DDP processes.
        limits = sorted({1, 10, self.cfg.val_detections})
        self._map = MeanAveragePrecision(
            iou_type="segm", backend="pycocotools", max_detection_thresholds=limits, sync_on_compute=True
        ).to(self.device)

    def validation_step(self, batch, batch_idx):
        images, targets, _ = batch
        outputs = self.model(images)
        preds = [
            {
                "masks": (o["masks"][:, 0] > self.mask_threshold),
                "scores": o["scores"],
                "labels": o["labels"],
            }
            for o in outputs
        ]
        truth = [{"masks": t["masks"].bool(), "labels": t["labels"]} for t in targets]
        self._map.update(preds, truth)

    def on_validation_epoch_end(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pycocotools' numpy deprecation notices, once per image
            result = self._map.compute()
        self._map = None
        logged = {"val/segm_map": float(result["map"]), "val/segm_map_50": float(result["map_50"])}
        self.log_dict({k: max(0.0, v) for k, v in logged.items()}, prog_bar=True, sync_dist=False)
