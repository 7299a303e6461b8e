"""The parts of a training stage both task families share: DVCLive inside a DVC stage, the callbacks
(budgets, progress lines, per-epoch and best checkpoints, early stopping) and how a run ended."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import lightning as L
from dvclive import Live
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from segflow.errors import SegflowError
from segflow.params import SharedTrainParams
from segflow.training import checkpoints
from segflow.training.callbacks import Budget, EpochLog


class StageLive(Live):
    """DVCLive for a stage of a DVC pipeline, without DVCLive's own repository handling.

    DVC runs this stage and versions what it writes (metrics and plots are
    declared in dvc.yaml), so DVCLive has no need to find the repository. Its
    own lookup (dvclive 3.49) crashes in a git repository without commits and
    runs ``dvc init`` in a git repository without DVC.
    """

    def _init_dvc(self) -> None:
        self._exp_name = self._exp_name or "segflow-train"
        if os.getenv("DVC_ROOT"):  # set by `dvc repro` / `dvc exp run`
            self._inside_dvc_pipeline = True
            self._init_dvc_pipeline()


def build_callbacks(
    cfg: SharedTrainParams, folder: Path, validated: bool, started: float | None = None
) -> tuple[list[L.Callback], ModelCheckpoint]:
    """Budget (``val_every``, ``max_minutes``), epoch log, checkpoints (every epoch's, to resume; the best by
    ``monitor``, among validated epochs) and early stopping (patience counted in validations).

    Returns:
        The callbacks, and the checkpoint callback holding the best weights (the last epoch's when nothing
        is monitored).

    Raises:
        SegflowError: ``monitor`` is a validation metric, but there is no validation split to compute it.
    """
    on_train = cfg.monitor.startswith("train/")  # known at the end of the training epoch, after validation
    monitored = validated or on_train
    if cfg.patience and not monitored:
        raise SegflowError(
            f"train.patience is {cfg.patience} but train.monitor {cfg.monitor} needs a validation split and there is "
            "none; set ingest.val_fraction above 0, train.monitor: train/loss, or train.patience: 0"
        )
    # What a killed run resumes from, written at the end of every epoch (after its validation, if any).
    # Not ModelCheckpoint(save_last=True): since Lightning 2.6 that writes last.ckpt only at a step that
    # also saved a top-k checkpoint, i.e. only after an improvement (never without a monitor).
    last = ModelCheckpoint(
        dirpath=folder,
        filename=Path(checkpoints.LAST).stem,
        monitor=None,
        save_top_k=1,
        save_last=False,
        enable_version_counter=False,
        save_on_train_epoch_end=True,
    )
    best = None
    if monitored:
        best = ModelCheckpoint(
            dirpath=folder,
            filename="best",
            monitor=cfg.monitor,
            mode=cfg.resolved_mode(),
            save_top_k=1,
            save_last=False,
            enable_version_counter=False,
            save_on_train_epoch_end=on_train,  # val/ metrics: at each validation (so among validated epochs)
        )
    budget = Budget(cfg.val_every, None if cfg.max_minutes is None else cfg.max_minutes * 60)
    epoch_log = EpochLog(time.perf_counter() if started is None else started, cfg.log_every_s, budget)
    # Lightning runs checkpoint callbacks last, in this order: `last` saves the state the others reached.
    callbacks: list[L.Callback] = [budget, epoch_log, *([best] if best else []), last]
    if cfg.patience:
        callbacks.append(
            EarlyStopping(
                monitor=cfg.monitor,
                mode=cfg.resolved_mode(),
                patience=cfg.patience,
                min_delta=cfg.min_delta,
                check_on_train_epoch_end=on_train or not validated,
                verbose=False,
            )
        )
    return callbacks, best or last


def make_trainer(
    cfg: SharedTrainParams,
    folder: Path,
    callbacks: list[L.Callback],
    live: Live | None,
    precision: str,
    strategy: object,
    benchmark: bool = False,
) -> L.Trainer:
    """The Lightning Trainer both families train with: params' budget and devices, DVCLive as the logger."""
    from dvclive.lightning import DVCLiveLogger

    return L.Trainer(
        max_epochs=cfg.epochs,
        check_val_every_n_epoch=cfg.val_every,  # and the last epoch (callbacks.Budget)
        deterministic=cfg.deterministic,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=strategy,
        precision=precision,
        logger=DVCLiveLogger(experiment=live, log_model=False) if live else False,
        callbacks=callbacks,
        default_root_dir=folder,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        benchmark=benchmark,
        gradient_clip_val=cfg.grad_clip or None,
        accumulate_grad_batches=cfg.accumulate,
        use_distributed_sampler=False,  # our samplers shard themselves (same batches for any worker count)
    )


def fit_summary(seed: int, trainer: L.Trainer, precision: str, train_images: int, val_images: int, cfg) -> dict:
    """The card's ``training`` entries every run has: seed, epochs trained, precision, images, ``val_every``."""
    summary = {
        "seed": seed,
        "epochs": trainer.current_epoch,
        "precision": precision,
        "train_images": train_images,
        "val_images": val_images,
    }
    if cfg.val_every > 1:
        summary["val_every"] = cfg.val_every
    return summary


def keep_best(module: L.LightningModule, checkpoint: ModelCheckpoint, cfg, also_as: str | None = None) -> dict:
    """Load the best monitored epoch's weights into ``module``; return what the card says of it
    (``monitor``, ``best_score``, the score again under ``also_as``, ``best_epoch`` 1-based). Without a
    monitored checkpoint the module keeps the last epoch's weights and nothing is returned."""
    import torch

    if not (checkpoint.monitor and checkpoint.best_model_path):
        return {}
    best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
    module.load_state_dict(best["state_dict"])
    found = {"monitor": cfg.monitor, "best_score": round(float(checkpoint.best_model_score), 6)}
    if also_as:
        found[also_as] = found["best_score"]
    return found | {"best_epoch": int(best["epoch"]) + 1}


def stop_summary(cfg: SharedTrainParams, trainer: L.Trainer, callbacks: list[L.Callback]) -> dict:
    """How training ended, for the card: stopped by ``max_minutes`` (when, after how long) or by patience."""
    budget = next(c for c in callbacks if isinstance(c, Budget))
    if budget.stopped:
        return {
            "stopped_by": "max_minutes",
            "max_minutes": cfg.max_minutes,
            "train_minutes": round(budget.stopped["train_seconds"] / 60, 2),
            "stopped_at": {k: budget.stopped[k] for k in ("epoch", "step", "steps")},
        }
    if trainer.early_stopping_callback is not None and trainer.early_stopping_callback.stopped_epoch:
        return {"stopped_early": True, "stopped_by": "patience"}
    return {}
