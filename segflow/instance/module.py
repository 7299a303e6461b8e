"""The LightningModule that trains Mask R-CNN: torchvision's summed losses, validation mask AP.

torchvision's detection models return their losses only in training mode and detections only in
eval mode, so validation scores COCO mask AP and has no loss. The scorer is the evaluate stage's own
(:mod:`segflow.instance.metrics`, pycocotools with ``maxDets`` = ``train.val_detections``): torchmetrics'
``MeanAveragePrecision`` reads pycocotools' summary, whose AP is fixed at 100 detections and comes out
-1 for any other limit. The loss watch, optimiser, schedule and checkpointed random state are shared
(:class:`segflow.training.module.TrainingModule`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist

from segflow.instance import metrics
from segflow.params import InstanceTrainParams
from segflow.training.hardware import broadcast_buffers
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
        self._seen: list[tuple[metrics.ImageTruth, metrics.ImagePrediction]] = []

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
        self._seen = []
        if _distributed():
            # BatchNorm trains here too: every process validates with rank 0's running statistics (DDP
            # keeps parameters equal, not buffers), so the AP is that of the one model that is saved.
            broadcast_buffers(self.model)

    def validation_step(self, batch, batch_idx):
        images, targets, indices = batch
        outputs = self.model(images)
        for output, target, index in zip(outputs, targets, indices, strict=True):
            true = target["masks"].cpu().numpy().astype(bool)
            ids = np.zeros(true.shape[1:], dtype=np.uint16)
            for n, mask in enumerate(true, start=1):
                ids[mask] = n
            classes = {n: int(c) - 1 for n, c in enumerate(target["labels"].tolist(), start=1)}
            found = output["masks"][:, 0] > self.mask_threshold
            keep = found.flatten(1).any(1)
            prediction = metrics.ImagePrediction(
                str(index),
                found[keep].cpu().numpy(),
                (output["labels"][keep] - 1).cpu().numpy(),
                output["scores"][keep].cpu().numpy().astype(np.float64),
            )
            self._seen.append((metrics.ImageTruth(str(index), ids, classes), prediction))

    def on_validation_epoch_end(self):
        seen = self._seen
        if _distributed():
            # Each process validated its shard: score the whole split (on every process: the same number).
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, seen)
            seen = [pair for part in gathered for pair in part]
        self._seen = []
        truths, preds = [t for t, _ in seen], [p for _, p in seen]
        result = metrics.evaluate(truths, preds, self.classes, max_dets=self.cfg.val_detections)
        logged = {"val/segm_map": result["segm"]["map"], "val/segm_map_50": result["segm"]["map_50"]}
        self.log_dict({k: float(v or 0.0) for k, v in logged.items()}, prog_bar=True, sync_dist=False)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
