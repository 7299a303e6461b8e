"""Lightning callbacks of the train stage."""

from __future__ import annotations

import logging
import resource
import time

import lightning as L
import torch

log = logging.getLogger(__name__)

#: The per-epoch progress line; segflow's flow reads ``epoch N/M`` from it to update the run's progress.
EPOCH_LINE = "epoch %d/%d: %s, %.1f s"


def _sync(module: L.LightningModule) -> None:
    """Wait for queued GPU work, so a host clock reading covers it (called twice an epoch, never per step)."""
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


def peak_memory_mb(device: torch.device) -> tuple[str, float]:
    """The metric name and value of the peak memory so far: CUDA allocations on a GPU, resident set on the CPU."""
    if device.type == "cuda":
        return "perf/peak_cuda_mb", torch.cuda.max_memory_allocated(device) / 2**20
    return "perf/peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class EpochLog(L.Callback):
    """Times the training loop and writes one log line per epoch, whatever the progress bar does.

    Stage output reaches the Prefect dashboard line by line; without a terminal Lightning's progress bar
    is off, and this is what shows that training is moving. Per epoch it logs (to DVCLive, with the
    other metrics) the training images/s with validation excluded, the share of training time the loop
    spent waiting for its next batch (``perf/data_wait_share``: near 0 means the data path keeps up),
    validation seconds and peak memory; once, the seconds from process start to the first step
    (``perf/startup_s``) and the first step itself (``perf/first_step_s``, which holds any compile time).

    Args:
        started: ``time.perf_counter()`` when the stage process started.
    """

    def __init__(self, started: float | None = None) -> None:
        self._process_start = time.perf_counter() if started is None else started
        self._epoch_start = self._last_end = self._batch_start = 0.0
        self._wait = self._train_seconds = self._val_seconds = self._val_start = 0.0
        self._images = 0
        self._once: dict[str, float] = {}
        self._once_logged = False

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._epoch_start = self._last_end = time.perf_counter()
        self._wait = self._train_seconds = self._val_seconds = 0.0
        self._images = 0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        self._wait += now - self._last_end  # fetching this batch (Lightning fetches one ahead) and moving it
        self._batch_start = now
        self._once.setdefault("perf/startup_s", now - self._process_start)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self._images += len(batch[0])
        first = "perf/first_step_s" not in self._once
        last = batch_idx + 1 >= trainer.num_training_batches
        if first or last:
            _sync(module)
        self._last_end = time.perf_counter()
        if first:
            self._once["perf/first_step_s"] = self._last_end - self._batch_start
            if trainer.is_global_zero:
                log.info(
                    "start-up: first step began %.1f s after the stage started and took %.1f s%s",
                    self._once["perf/startup_s"],
                    self._once["perf/first_step_s"],
                    " (torch.compile included)" if getattr(module, "compiled", False) else "",
                )
        if last:
            self._train_seconds = self._last_end - self._epoch_start

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        _sync(module)
        self._val_seconds += time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Lightning 2 runs the epoch's validation before this hook: its metrics are in.
        metrics = trainer.callback_metrics
        names = (("train/loss", "train loss"), ("val/loss", "val loss"), ("val/iou_macro", "val IoU"))
        shown = [f"{label} {float(metrics[key]):.4f}" for key, label in names if key in metrics]
        perf = self.epoch_figures(module.device)
        if self._once and not self._once_logged:  # the first epoch this process ran (also after a resume)
            perf.update(self._once)
            self._once_logged = True
        module.log_dict(perf, on_step=False, on_epoch=True, rank_zero_only=True)
        if not trainer.is_global_zero:
            return
        shown.append(
            f"{perf['perf/images_per_s']:.1f} img/s, data wait {perf['perf/data_wait_share']:.0%}"
            + (f", validation {self._val_seconds:.1f} s" if self._val_seconds else "")
        )
        seconds = time.perf_counter() - self._epoch_start
        log.info(EPOCH_LINE, trainer.current_epoch + 1, trainer.max_epochs, ", ".join(shown), seconds)

    def epoch_figures(self, device: torch.device) -> dict[str, float]:
        """This epoch's throughput figures, as logged."""
        train_seconds = self._train_seconds or (time.perf_counter() - self._epoch_start)
        name, peak = peak_memory_mb(device)
        figures = {
            "perf/images_per_s": self._images / train_seconds if train_seconds else 0.0,
            "perf/data_wait_share": self._wait / train_seconds if train_seconds else 0.0,
            name: peak,
        }
        if self._val_seconds:
            figures["perf/validation_s"] = self._val_seconds
        return figures
