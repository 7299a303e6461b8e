"""The LightningModule that trains a semantic model: loss, optimiser, schedule, validation IoU/Dice.

The loss watch, optimiser, schedule and checkpointed random state are the shared
:class:`segflow.training.module.TrainingModule`'s.
"""

from __future__ import annotations

import logging

import torch

from segflow.params import TrainParams
from segflow.semantic import metrics
from segflow.semantic.losses import build_loss
from segflow.training.hardware import broadcast_buffers
from segflow.training.module import TrainingModule

log = logging.getLogger(__name__)


class SegmentationModule(TrainingModule):
    """Lightning wrapper: loss, optimiser and schedule from params, validation IoU/Dice over all processes.

    Args:
        channels_last: keep weights and input batches in channels_last memory format.
        compile: run the forward pass through ``torch.compile`` (``self.model`` stays the plain
            module, which is what is saved).
        class_weights: one per class, for the loss's cross-entropy or focal term (:func:`build_loss`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        params: TrainParams,
        classes: list[str],
        *,
        channels_last: bool = False,
        compile: bool = False,
        class_weights: list[float] | None = None,
    ):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.channels_last = channels_last
        self.compiled = compile
        # Not a registered submodule: the state dict keeps the plain model's names.
        self.__dict__["net"] = torch.compile(self.model) if compile else self.model
        self.loss = build_loss(params.loss, class_weights)
        self.cfg = params
        self.classes = classes
        self.reset_watch()
        self._val_totals: torch.Tensor | None = None  # (4, C) tp/fp/fn/tn summed, on the device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.channels_last:
            images, *rest = batch
            batch = (images.contiguous(memory_format=torch.channels_last), *rest)
        return batch

    def training_step(self, batch, batch_idx):
        images, masks, _ = batch
        loss = self.loss(self(images), masks)
        self._count(loss, batch_idx)
        self.log(
            "train/loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(images),
            sync_dist=self.trainer.world_size > 1,
        )
        return loss

    # -- validation: counts summed on the device, then over all processes --------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_totals = torch.zeros(4, len(self.classes), dtype=torch.long, device=self.device)
        if self.trainer.world_size > 1:
            # Every process validates with rank 0's BatchNorm statistics (DDP keeps parameters equal,
            # not buffers), so the score is that of the one model that is saved.
            broadcast_buffers(self.model)

    def validation_step(self, batch, batch_idx):
        images, masks, _ = batch
        logits = self(images)
        self.log(
            "val/loss",
            self.loss(logits, masks),
            on_epoch=True,
            prog_bar=True,
            batch_size=len(images),
            sync_dist=self.trainer.world_size > 1,
        )
        counts = torch.stack([c.sum(0) for c in metrics.confusion_counts(logits.argmax(1), masks, len(self.classes))])
        self._val_totals += counts  # summed on the device: no copy to the host per batch

    def on_validation_epoch_end(self):
        # Each process saw its shard of the val split; the sum over processes is the whole split.
        totals = self.trainer.strategy.reduce(self._val_totals, reduce_op="sum").cpu()
        self._val_totals = None
        summary = metrics.summarize(*(t[None] for t in totals), self.classes)
        logged = {"val/iou_macro": summary["iou"]["macro"], "val/dice_macro": summary["dice"]["macro"]}
        logged.update({f"val/iou_{c}": v for c, v in summary["iou"]["per_class"].items() if v is not None})
        self.log_dict({k: float(v or 0.0) for k, v in logged.items()}, prog_bar=False, sync_dist=False)
