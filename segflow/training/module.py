"""What both task families' LightningModules share: a loss that must stay a number, the optimiser and its
per-step schedule from params, and the random state a checkpoint carries (so a resumed run continues
the same stream).

The loss is watched for NaN/inf on the device (looked at every step on the CPU, every
:data:`NAN_CHECK_EVERY` steps on CUDA) and a diverging run stops with one line.
"""

from __future__ import annotations

import math
import random

import lightning as L
import numpy as np
import torch

from segflow.errors import SegflowError

#: How often (optimiser steps) a CUDA run looks at its non-finite-loss flag; on the CPU: every step.
NAN_CHECK_EVERY = 50


class NonFiniteLoss(SegflowError):
    """The training loss became NaN or infinite."""


class TrainingModule(L.LightningModule):
    """The shared half: subclasses set ``self.cfg`` (the train section), call :meth:`reset_watch` in
    ``__init__`` and :meth:`_watch` with each training loss."""

    def reset_watch(self) -> None:
        self._first_bad: torch.Tensor | None = None  # index of the first batch with a non-finite loss, or -1
        self._loss_sum: torch.Tensor | None = None  # this epoch's training losses summed, on the device
        self._loss_steps = 0

    def _count(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Watch the loss and add it to the epoch's running sum."""
        self._watch(loss, batch_idx)
        running = loss.detach()
        self._loss_sum = running.clone() if self._loss_sum is None else self._loss_sum + running
        self._loss_steps += 1

    # -- a loss that stops being a number stops the run -------------------------------------------

    def _watch(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Remember the first batch whose loss is not finite, on the device (no wait for the GPU per step)."""
        index = self.current_epoch * self.trainer.num_training_batches + batch_idx
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()) & (self._first_bad < 0)
        self._first_bad = torch.where(bad, torch.full_like(self._first_bad, index), self._first_bad)
        if loss.device.type == "cpu" or (batch_idx + 1) % NAN_CHECK_EVERY == 0:
            self.check_finite()

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLoss` naming the epoch and step if the loss has not stayed finite."""
        if self._first_bad is None or int(self._first_bad) < 0:
            return
        per_epoch = self.trainer.num_training_batches
        epoch, step = divmod(int(self._first_bad), per_epoch)
        cfg = self.cfg
        precision = self.trainer.precision
        raise NonFiniteLoss(
            f"the training loss became NaN or infinite at epoch {epoch + 1}, step {step + 1} of {per_epoch}; "
            f"the run is diverging: lower train.lr (now {cfg.lr:g})"
            + (
                f", use train.precision: bf16-mixed or 32 (fp16 overflows: now {precision})"
                if "16" in precision
                else ""
            )
            + (", set train.grad_clip (e.g. 1.0)" if not cfg.grad_clip else "")
            + ", or check the images for NaN/inf values"
        )

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._loss_steps = None, 0

    def running_loss(self) -> float | None:
        """This epoch's mean training loss so far (this process's batches); waits for the device."""
        return float(self._loss_sum) / self._loss_steps if self._loss_steps else None

    def on_train_epoch_end(self) -> None:
        self.check_finite()

    # -- optimiser, schedule, and what a checkpoint carries besides weights ------------------------

    def configure_optimizers(self):
        cfg = self.cfg
        fused = self.device.type == "cuda"  # one kernel for the whole update instead of one per tensor
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(),
                lr=cfg.lr,
                momentum=cfg.momentum,
                nesterov=cfg.momentum > 0,
                weight_decay=cfg.weight_decay,
                fused=fused or None,
            )
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(cfg.warmup_epochs * total / max(1, self.trainer.max_epochs))
        schedule = build_schedule(optimizer, cfg.schedule, cfg.lr, total, warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Tensors and plain values only, so the checkpoint loads with torch.load(weights_only=True).
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        version, python_state, python_gauss = random.getstate()
        checkpoint["segflow_rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            "python": [version, list(python_state), python_gauss],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("segflow_rng")
        if states:
            torch.set_rng_state(states["torch"])
            if states["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
            kind, keys, position, has_gauss, gauss = states["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
            version, python_state, python_gauss = states["python"]
            random.setstate((version, tuple(python_state), python_gauss))


def build_schedule(
    optimizer: torch.optim.Optimizer, name: str, lr: float, total: int, warmup: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-step learning-rate schedule ``name`` over ``total`` steps, ``warmup`` of them linear warm-up.

    onecycle is torch's (its own warm-up: 30% of the steps); cosine anneals to 0 after the warm-up;
    poly is DeepLab's ``(1 - t/T)^0.9``; constant holds ``lr`` after the warm-up.
    """
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if name == "poly":
            return (1.0 - progress) ** 0.9
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
