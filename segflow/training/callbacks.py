"""Lightning callbacks of the train stage: the epoch log with its progress lines, and the run's budgets."""

from __future__ import annotations

import logging
import resource
import time

import lightning as L
import torch

log = logging.getLogger(__name__)

#: The per-epoch progress line; segflow's flow reads ``epoch N/M`` from it to update the run's progress.
EPOCH_LINE = "epoch %d/%d: %s, %.1f s"
#: The progress lines within an epoch (at most one per ``train.log_every_s``); the flow reads their
#: ``epoch N/M, step s/S`` (or ``validation b/B``) prefix too (segflow/ops/runner.py).
STEP_LINE = "epoch %d/%d, step %d/%d: %s"
VALIDATION_LINE = "epoch %d/%d, validation %d/%d: %s"
#: Said once when ``train.max_minutes`` stops the run; the flow takes it for the end of training.
STOP_LINE = "stopped by train.max_minutes (%g): %s of training used, at epoch %d/%d, step %d/%d; %s"
#: In a run of several processes the time budget is compared across them (one collective) every this many steps.
BUDGET_SYNC_STEPS = 10


def clock() -> float:
    """The seconds the callbacks measure with (``time.perf_counter``); tests replace it with a scripted clock."""
    return time.perf_counter()


def duration(seconds: float) -> str:
    """``42s``, ``3m10s``, ``1h02m``: a span of time as a person reads it in a log line."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _images_in(batch) -> int:
    """The images in a batch: (images, masks, ...) from segflow's loaders; 1 for anything without a batch axis."""
    images = batch[0] if isinstance(batch, list | tuple) else batch
    return int(images.shape[0]) if isinstance(images, torch.Tensor) and images.ndim else 1


def _sync(module: L.LightningModule) -> None:
    """Wait for queued GPU work, so a host clock reading covers it (called twice an epoch, never per step)."""
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


def peak_memory_mb(device: torch.device) -> tuple[str, float]:
    """The metric name and value of the peak memory so far: CUDA allocations on a GPU, resident set on the CPU."""
    if device.type == "cuda":
        return "perf/peak_cuda_mb", torch.cuda.max_memory_allocated(device) / 2**20
    return "perf/peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Budget(L.Callback):
    """Which epochs validate (``train.val_every``) and when training stops for time (``train.max_minutes``).

    Validation runs every ``val_every`` epochs and always after the last one; the epochs between are trained
    only, so the kept epoch (ModelCheckpoint, on validation) is a validated one and early stopping's patience
    counts validations. Lightning's ``check_val_every_n_epoch`` is set per epoch for that.

    Training time is counted from Lightning's ``on_train_start`` and kept in every checkpoint
    (``train_seconds``), so a resumed run goes on counting from what the killed one had used up to its last
    checkpoint (the part of a killed epoch after it is trained again, and counted again). Once the budget
    is used, after a step, the run stops: the epoch loop validates once more unless this epoch's weights are
    the validated ones already, and the best validated weights are kept. With several processes the
    decision is taken together every :data:`BUDGET_SYNC_STEPS` steps and at each epoch's last step (no
    collective at all without a budget).

    Args:
        val_every: validate every this many epochs (and after the last).
        max_seconds: the training time budget; None: no limit.
    """

    def __init__(self, val_every: int = 1, max_seconds: float | None = None) -> None:
        self.val_every = val_every
        self.max_seconds = max_seconds
        self._before = 0.0  # seconds used by earlier (killed) parts of this run, from the checkpoint
        self._started: float | None = None
        self._validated_epoch = -1
        #: Where the budget stopped training: {"epoch", "step", "steps", "train_seconds"}; None: it did not.
        self.stopped: dict | None = None

    # -- what is kept in checkpoints -----------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"train_seconds": self.spent()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._before = float(state_dict.get("train_seconds", 0.0))

    def spent(self) -> float:
        """Training seconds of this run so far, killed parts up to their last checkpoint included."""
        return self._before + (clock() - self._started if self._started is not None else 0.0)

    def seconds_left(self) -> float | None:
        """What is left of the time budget (None: no budget)."""
        return None if self.max_seconds is None else max(0.0, self.max_seconds - self.spent())

    def validates(self, epoch: int, max_epochs: int) -> bool:
        """Whether epoch ``epoch`` (0-based) ends with a validation: every ``val_every``-th, and the last."""
        return (epoch + 1) % self.val_every == 0 or epoch + 1 >= max_epochs

    # -- hooks -------------------------------------------------------------------------------------

    def _plan(self, trainer: L.Trainer) -> None:
        # Lightning validates epoch e when (e + 1) % check_val_every_n_epoch == 0: 1 makes the last epoch validate.
        last = trainer.current_epoch + 1 >= trainer.max_epochs
        trainer.check_val_every_n_epoch = 1 if last else self.val_every

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._started = clock()
        self._plan(trainer)  # also for the epoch a resumed run restarts in
        if self.max_seconds is None or self._before < self.max_seconds or trainer.current_epoch >= trainer.max_epochs:
            return
        # Interrupted after the budget had run out: its last checkpoint holds the stop's validation already.
        trainer.should_stop = True
        steps = trainer.num_training_batches
        self.stopped = {"epoch": trainer.current_epoch, "step": steps, "steps": steps, "train_seconds": self._before}
        if trainer.is_global_zero:
            log.info(
                "stopped by train.max_minutes (%g): %s of training used before the run was interrupted; "
                "keeping the best validated weights",
                self.max_seconds / 60,
                duration(self._before),
            )

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._plan(trainer)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def _over(self, trainer: L.Trainer) -> bool:
        over = self.spent() >= self.max_seconds
        if trainer.world_size > 1:  # every process must stop after the same step
            over = trainer.strategy.reduce_boolean_decision(over, all=False)
        return over

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.max_seconds is None or self.stopped is not None:
            return
        last = batch_idx + 1 >= trainer.num_training_batches
        if last and trainer.current_epoch + 1 >= trainer.max_epochs:
            return  # the run ends here anyway: the budget cut nothing short
        if trainer.world_size > 1 and not last and (batch_idx + 1) % BUDGET_SYNC_STEPS:
            return
        if not self._over(trainer):
            return
        self._stop(trainer, batch_idx + 1)
        trainer.check_val_every_n_epoch = 1  # the epoch loop validates after this step, then the run ends

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # The budget can run out during the epoch's validation: stop now rather than after one more step (and
        # its validation), unless this epoch's weights have not been validated.
        if self.max_seconds is None or self.stopped is not None or trainer.current_epoch + 1 >= trainer.max_epochs:
            return
        validated = self._validated_epoch == trainer.current_epoch or not trainer.enable_validation
        if self._over(trainer) and validated:
            self._stop(trainer, trainer.num_training_batches)
            trainer.should_stop = True

    def _stop(self, trainer: L.Trainer, step: int) -> None:
        trainer.should_stop = True
        steps = trainer.num_training_batches
        self.stopped = {"epoch": trainer.current_epoch + 1, "step": step, "steps": steps}
        self.stopped["train_seconds"] = round(self.spent(), 1)
        if trainer.is_global_zero:
            fresh = self._validated_epoch == trainer.current_epoch and step >= steps
            log.info(
                STOP_LINE,
                self.max_seconds / 60,
                duration(self.spent()),
                trainer.current_epoch + 1,
                trainer.max_epochs,
                step,
                steps,
                "keeping the best validated weights"
                if fresh or not trainer.enable_validation
                else "validating these weights, then keeping the best validated ones",
            )


class EpochLog(L.Callback):
    """Times the training loop and writes one log line per epoch, whatever the progress bar does.

    Stage output reaches the Prefect dashboard line by line; without a terminal Lightning's progress bar
    is off, and this is what shows that training is moving. Per epoch it logs (to DVCLive, with the
    other metrics) the training images/s with validation excluded, the share of training time the loop
    spent waiting for its next batch (``perf/data_wait_share``: near 0 means the data path keeps up),
    validation seconds and peak memory; once, the seconds from process start to the first step
    (``perf/startup_s``) and the first step itself (``perf/first_step_s``, which holds any compile time).

    Within an epoch (and a validation) it writes a progress line whenever ``every_s`` seconds have passed
    since its last line: ``epoch 3/20, step 120/400: 52.1 img/s, loss 0.4123, epoch ETA 3m10s, run ETA
    1h02m`` (the loss is the epoch's running mean). The ETAs come from this epoch's seconds per step and
    the last validation's duration (none before the first), for the epochs and validations left, capped by
    the time budget. The clock is read after each step anyway; a line costs one wait for the device.

    Args:
        started: ``time.perf_counter()`` when the stage process started.
        every_s: seconds between progress lines within an epoch; 0: none.
        budget: the run's :class:`Budget` (which epochs validate, time left); None: every epoch, no limit.
    """

    def __init__(self, started: float | None = None, every_s: float = 0.0, budget: Budget | None = None) -> None:
        self._process_start = clock() if started is None else started
        self._epoch_start = self._last_end = self._batch_start = 0.0
        self._wait = self._train_seconds = self._val_seconds = self._val_start = 0.0
        self._images = 0
        self._once: dict[str, float] = {}
        self._once_logged = False
        self._every = every_s
        self._budget = budget
        self._last_line = clock()
        self._validated = False  # this epoch ran its validation
        self._last_val_s: float | None = None  # the latest validation's duration
        self._val_images = 0

    def _said(self) -> None:
        self._last_line = clock()

    def _due(self, now: float, trainer: L.Trainer) -> bool:
        return bool(self._every) and trainer.is_global_zero and now - self._last_line >= self._every

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._epoch_start = self._last_end = clock()
        self._wait = self._train_seconds = self._val_seconds = 0.0
        self._images = 0
        self._validated = False

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        now = clock()
        self._wait += now - self._last_end  # fetching this batch (Lightning fetches one ahead) and moving it
        self._batch_start = now
        self._once.setdefault("perf/startup_s", now - self._process_start)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self._images += len(batch[0])
        first = "perf/first_step_s" not in self._once
        # A run stopped after this step (train.max_minutes) ends its epoch here.
        last = batch_idx + 1 >= trainer.num_training_batches or trainer.should_stop
        if first or last:
            _sync(module)
        self._last_end = clock()
        if first:
            self._once["perf/first_step_s"] = self._last_end - self._batch_start
            if trainer.is_global_zero:
                log.info(
                    "start-up: first step began %.1f s after the stage started and took %.1f s%s",
                    self._once["perf/startup_s"],
                    self._once["perf/first_step_s"],
                    " (torch.compile included)" if getattr(module, "compiled", False) else "",
                )
                self._said()
        if last:
            self._train_seconds = self._last_end - self._epoch_start
        if self._due(self._last_end, trainer) and not trainer.should_stop:  # a stop says where it stopped
            self._step_line(trainer, module, batch_idx + 1)

    def _step_line(self, trainer: L.Trainer, module: L.LightningModule, done: int) -> None:
        epoch, epochs, steps = trainer.current_epoch, trainer.max_epochs, trainer.num_training_batches
        elapsed = self._last_end - self._epoch_start
        per_step = elapsed / done
        validates = self._budget.validates if self._budget else (lambda e, m: True)
        val_s = self._last_val_s if trainer.enable_validation and self._last_val_s is not None else 0.0
        epoch_left = (steps - done) * per_step + (val_s if validates(epoch, epochs) else 0.0)
        later = range(epoch + 1, epochs)
        run_left = epoch_left + len(later) * steps * per_step + val_s * sum(validates(e, epochs) for e in later)
        budget_left = self._budget.seconds_left() if self._budget else None
        run_eta = duration(run_left)
        if budget_left is not None and budget_left < run_left:
            run_eta = f"{duration(budget_left)} (train.max_minutes)"
        shown = [f"{self._images / elapsed if elapsed else 0.0:.1f} img/s"]
        loss = module.running_loss() if hasattr(module, "running_loss") else None
        if loss is not None:
            shown.append(f"loss {loss:.4f}")
        shown += [f"epoch ETA {duration(epoch_left)}", f"run ETA {run_eta}"]
        log.info(STEP_LINE, epoch + 1, epochs, done, steps, ", ".join(shown))
        self._said()

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._val_start = clock()
        self._val_images = 0

    def on_validation_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._val_images += _images_in(batch)
        now = clock()
        if trainer.sanity_checking or not self._due(now, trainer):
            return
        total = trainer.num_val_batches[dataloader_idx] if trainer.num_val_batches else batch_idx + 1
        elapsed = now - self._val_start
        left = (total - batch_idx - 1) * elapsed / (batch_idx + 1)
        rate = self._val_images / elapsed if elapsed else 0.0
        shown = f"{rate:.1f} img/s, ETA {duration(left)}"
        log.info(VALIDATION_LINE, trainer.current_epoch + 1, trainer.max_epochs, batch_idx + 1, total, shown)
        self._said()

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        _sync(module)
        seconds = clock() - self._val_start
        self._val_seconds += seconds
        self._last_val_s = seconds
        self._validated = True

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Lightning 2 runs the epoch's validation before this hook: its metrics are in (when it validated).
        metrics = trainer.callback_metrics
        names = [("train/loss", "train loss")]
        if self._validated:  # otherwise the val/ metrics are an earlier epoch's
            names += [("val/loss", "val loss"), ("val/iou_macro", "val IoU")]
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
        stopped = self._budget.stopped if self._budget else None
        if stopped and stopped["step"] < stopped["steps"]:
            shown.append(f"stopped after step {stopped['step']} of {stopped['steps']}")
        seconds = clock() - self._epoch_start
        log.info(EPOCH_LINE, trainer.current_epoch + 1, trainer.max_epochs, ", ".join(shown), seconds)
        self._said()

    def epoch_figures(self, device: torch.device) -> dict[str, float]:
        """This epoch's throughput figures, as logged."""
        train_seconds = self._train_seconds or (clock() - self._epoch_start)
        name, peak = peak_memory_mb(device)
        figures = {
            "perf/images_per_s": self._images / train_seconds if train_seconds else 0.0,
            "perf/data_wait_share": self._wait / train_seconds if train_seconds else 0.0,
            name: peak,
        }
        if self._val_seconds:
            figures["perf/validation_s"] = self._val_seconds
        return figures
