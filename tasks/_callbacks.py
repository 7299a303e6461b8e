"""Lightning callbacks of the train stage."""

from __future__ import annotations

import logging
import time

import lightning as L

log = logging.getLogger("tasks.train")

#: The per-epoch progress line; segflow's flow reads ``epoch N/M`` from it to update the run's progress.
EPOCH_LINE = "epoch %d/%d: %s, %.1f s"


class EpochLog(L.Callback):
    """One log line per epoch (train loss, val loss, val IoU, seconds), whatever the progress bar does.

    Stage output reaches the Prefect dashboard line by line; without a terminal Lightning's progress bar
    is off, and this is what shows that training is moving.
    """

    def __init__(self) -> None:
        self._started = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Lightning 2 runs the epoch's validation before this hook: its metrics are in.
        metrics = trainer.callback_metrics
        names = (("train/loss", "train loss"), ("val/loss", "val loss"), ("val/iou_macro", "val IoU"))
        shown = ", ".join(f"{label} {float(metrics[key]):.4f}" for key, label in names if key in metrics)
        seconds = time.perf_counter() - self._started
        log.info(EPOCH_LINE, trainer.current_epoch + 1, trainer.max_epochs, shown or "no metrics", seconds)
