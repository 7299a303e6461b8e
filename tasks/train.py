"""Stage ``train``: fit an smp model with Lightning, log with DVCLive, save it.

Reads the manifest (``${paths.ingest}``) and the saved pipelines
(``${paths.augment}``). Writes ``${paths.train}/model/`` (weights as
safetensors, ``model.json`` card, ``preprocess.json``) and DVCLive's metrics
and plots under ``${paths.train}/live/``. The weights kept are those of the
epoch with the best validation macro IoU (the last epoch when there is no
validation split).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports: start-up is reported from here

from tasks._guard import preflight

if __name__ == "__main__":
    preflight("train")  # a bad params.yaml fails here, before the imports below (seconds for torch)

import contextlib
import functools
import hashlib
import logging
import math
import os
import random
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import segmentation_models_pytorch as smp
import torch
from dvclive import Live
from dvclive.lightning import DVCLiveLogger
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from tasks import _checkpoints, _guard, _metrics, _model
from tasks._callbacks import EpochLog
from tasks._common import SegflowError, stage_main
from tasks._data import SeededSampler, SegmentationDataset, same_shape_batches
from tasks._files import (
    EVAL_PIPELINE,
    LIVE_DIR,
    MANIFEST,
    MODEL_DIR,
    TRAIN_PIPELINE,
    image_channels,
    load_transform,
    read_manifest,
    split_rows,
)
from tasks.params import IGNORE_INDEX, Params, Paths, TrainParams, available_cores

log = logging.getLogger(__name__)

#: Where the stage keeps its resumable checkpoints, relative to the project root (see tasks/_checkpoints.py).
CHECKPOINTS = _guard.STATE_DIR / "checkpoints"
#: How often (optimiser steps) a CUDA run looks at its non-finite-loss flag; on the CPU: every step.
NAN_CHECK_EVERY = 50


class NonFiniteLoss(SegflowError):
    """The training loss became NaN or infinite."""


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


class SegmentationModule(L.LightningModule):
    """Lightning wrapper: loss, optimiser and schedule from params, validation IoU/Dice over all processes.

    Args:
        channels_last: keep weights and input batches in channels_last memory format.
        compile: run the forward pass through ``torch.compile`` (``self.model`` stays the plain
            module, which is what is saved).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        params: TrainParams,
        classes: list[str],
        *,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.channels_last = channels_last
        self.compiled = compile
        # Not a registered submodule: the state dict keeps the plain model's names.
        self.__dict__["net"] = torch.compile(self.model) if compile else self.model
        self.loss = build_loss(params.loss)
        self.cfg = params
        self.classes = classes
        self._val_totals: torch.Tensor | None = None  # (4, C) tp/fp/fn/tn summed, on the device
        self._first_bad: torch.Tensor | None = None  # index of the first batch with a non-finite loss, or -1

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
        self._watch(loss, batch_idx)
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

    def on_train_epoch_end(self) -> None:
        self.check_finite()

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
        counts = torch.stack([c.sum(0) for c in _metrics.confusion_counts(logits.argmax(1), masks, len(self.classes))])
        self._val_totals += counts  # summed on the device: no copy to the host per batch

    def on_validation_epoch_end(self):
        # Each process saw its shard of the val split; the sum over processes is the whole split.
        totals = self.trainer.strategy.reduce(self._val_totals, reduce_op="sum").cpu()
        self._val_totals = None
        summary = _metrics.summarize(*(t[None] for t in totals), self.classes)
        logged = {"val/iou_macro": summary["iou"]["macro"], "val/dice_macro": summary["dice"]["macro"]}
        logged.update({f"val/iou_{c}": v for c, v in summary["iou"]["per_class"].items() if v is not None})
        self.log_dict({k: float(v or 0.0) for k, v in logged.items()}, prog_bar=False, sync_dist=False)

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


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def has_unused_parameters(model: torch.nn.Module, channels: int, size: int) -> bool:
    """Whether some parameters take no part in the output (an encoder cut short by ``encoder_depth``).

    DDP must then be told to look for them each step (a little slower), or it fails at the first step.
    """
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(2, channels, size, size)).float().sum().backward()
        unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
    finally:
        for p in model.parameters():
            p.grad = None
        model.train(was_training)
    return unused


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict's names and bytes (what the ranks of a DDP run compare)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class _StageLive(Live):
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


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16 mixed precision on GPUs that have it, fp16 mixed on older ones, fp32 on CPU."""
    if precision != "auto":
        return precision
    if accelerator != "cpu" and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def check_accelerator(accelerator: str) -> None:
    """``gpu`` needs a GPU torch can use.

    Raises:
        SegflowError: there is none.
    """
    if accelerator == "gpu" and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        raise SegflowError(
            "train.accelerator is gpu, but torch finds no usable GPU on this machine (no CUDA device); "
            "set train.accelerator: auto (a GPU when there is one, else the CPU) or cpu"
        )


def on_gpu(accelerator: str) -> bool:
    """Whether training will run on a CUDA GPU (``auto`` picks one when there is one)."""
    return accelerator != "cpu" and torch.cuda.is_available()


def _loader(
    dataset: SegmentationDataset,
    params: TrainParams,
    seed: int,
    workers: int,
    train: bool,
    rank: int = 0,
    world: int = 1,
) -> DataLoader:
    common = {
        "num_workers": workers,
        "persistent_workers": workers > 0,  # workers (and the cache they share) live for the whole run
        "prefetch_factor": 4 if workers else None,
        "pin_memory": torch.cuda.is_available(),
    }
    if not train:
        # Full images, padded to the model's stride; batches group images of one size; a shard per process.
        batches = same_shape_batches(dataset.rows, params.batch_size, rank, world)
        return DataLoader(dataset, batch_sampler=batches, **common)
    per_process = math.ceil(len(dataset) / world)
    return DataLoader(
        dataset,
        batch_size=params.batch_size,
        sampler=SeededSampler(len(dataset), seed, rank=rank, world=world),
        drop_last=per_process > params.batch_size,  # a lone 1-image last batch upsets BatchNorm
        **common,
    )


def _prepare_data(datasets: list[SegmentationDataset], cache_mb: int) -> str:
    """Decode the datasets into memory when they fit in ``cache_mb`` together; says what it did."""
    need = sum(d.decoded_bytes() for d in datasets)
    if not cache_mb or need > cache_mb * 2**20:
        why = "train.cache_mb is 0" if not cache_mb else f"{need / 2**20:.0f} MiB > train.cache_mb {cache_mb}"
        return f"decoded every epoch ({why})"
    for dataset in datasets:
        dataset.preload(cache_mb * 2**20, threads=available_cores())
    return f"{sum(map(len, datasets))} images decoded once and cached ({need / 2**20:.1f} MiB)"


def _run_key(params: Params, paths: Paths) -> str:
    """What identifies this training run for resuming: its params, input data and code."""
    train = params.train.model_dump(mode="json", exclude=set(_checkpoints.SPEED_ONLY))
    keyed = {
        "seed": params.seed,
        "classes": params.classes,
        "normalize": [params.augment.normalize.mean, params.augment.normalize.std],
        "geometry": [params.augment.pad_divisor, params.augment.crop_size],
        "train": train,
        "export": params.register.export,
    }
    inputs = [paths.ingest / MANIFEST, paths.augment / TRAIN_PIPELINE, paths.augment / EVAL_PIPELINE]
    return _checkpoints.run_key(keyed, inputs, list(Path(__file__).parent.glob("*.py")))


def _callbacks(cfg: TrainParams, folder: Path, validated: bool) -> tuple[list[L.Callback], ModelCheckpoint]:
    """Epoch log, checkpoints (the last epoch's, to resume; the best by ``monitor``) and early stopping.

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
    checkpoint = ModelCheckpoint(
        dirpath=folder,
        filename="best",
        monitor=cfg.monitor if monitored else None,
        mode=cfg.resolved_mode(),
        save_top_k=1 if monitored else 0,
        save_last=True,
        enable_version_counter=False,
        save_on_train_epoch_end=on_train or not validated,
    )
    callbacks: list[L.Callback] = [EpochLog(STARTED), checkpoint]
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
    return callbacks, checkpoint


def _strategy(
    cfg: TrainParams, model: torch.nn.Module, channels: int, stride: int
) -> str | L.pytorch.strategies.Strategy:
    """The Lightning strategy: ``ddp`` told about unused parameters when the model has some."""
    if cfg.strategy != "ddp":
        return cfg.strategy
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(find_unused_parameters=has_unused_parameters(model, channels, 2 * stride))


def run(params: Params, paths: Paths, checkpoint_root: Path | None = None) -> dict:
    """Train and save the model under ``paths.train``.

    Args:
        checkpoint_root: where resumable per-epoch checkpoints are kept (the stage passes
            ``.segflow/checkpoints``); None keeps them in a scratch folder removed at the end.

    Returns:
        Training summary (also stored in the model card's ``training`` field).
    """
    cfg = params.train
    check_accelerator(cfg.accelerator)
    entered = time.perf_counter()
    L.seed_everything(params.seed, workers=True, verbose=False)
    manifest = read_manifest(paths.ingest)
    train_rows = split_rows(manifest, "train")
    val_rows = split_rows(manifest, "val", required=False)
    num_classes = len(params.classes)
    channels = image_channels(manifest)
    mean, std = params.augment.normalize.for_channels(channels)
    train_set = SegmentationDataset(
        paths.ingest, train_rows, load_transform(paths.augment / TRAIN_PIPELINE, params.seed)
    )
    val_set = SegmentationDataset(paths.ingest, val_rows, load_transform(paths.augment / EVAL_PIPELINE))
    data_note = _prepare_data([train_set, val_set], cfg.cache_mb)
    data_ready = time.perf_counter()

    gpu = on_gpu(cfg.accelerator)
    module = SegmentationModule(
        _model.build(cfg, num_classes, channels),
        cfg,
        params.classes,
        channels_last=cfg.use_channels_last(gpu),
        compile=cfg.compile,
    )
    precision = resolve_precision(cfg.precision, cfg.accelerator)
    # Under DDP the validation scores are computed from counts already summed over processes and the perf
    # figures are rank 0's: Lightning's advice to sync each of them again does not apply.
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*", category=UserWarning)
    persistent = checkpoint_root is not None and cfg.resume
    with contextlib.ExitStack() as stack:
        if persistent:
            key = _run_key(params, paths)
            primary = rank_zero_only.rank == 0  # only rank 0 prunes; the others use the same folder
            folder = _checkpoints.folder(checkpoint_root, key) if primary else checkpoint_root / f"train-{key}"
        else:
            folder = stack.enter_context(_guard.scratch("train"))
        callbacks, checkpoint = _callbacks(cfg, folder, bool(len(val_set)))
        live = None
        if rank_zero_only.rank == 0:  # other DDP processes write nothing
            live = _StageLive(dir=str(paths.train / LIVE_DIR), dvcyaml=None, save_dvc_exp=False, report=None)
        trainer = L.Trainer(
            max_epochs=cfg.epochs,
            deterministic=cfg.deterministic,
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            num_nodes=cfg.num_nodes,
            strategy=_strategy(cfg, module.model, channels, params.augment.pad_divisor),
            precision=precision,
            logger=DVCLiveLogger(experiment=live, log_model=False) if live else False,
            callbacks=callbacks,
            default_root_dir=folder,
            log_every_n_steps=1,
            num_sanity_val_steps=0,
            enable_progress_bar=sys.stderr.isatty(),
            enable_model_summary=False,
            benchmark=gpu and not cfg.deterministic,  # crops have one size: cuDNN's autotuned kernels pay off
            gradient_clip_val=cfg.grad_clip or None,
            accumulate_grad_batches=cfg.accumulate,
            use_distributed_sampler=False,  # our samplers shard themselves (same batches for any worker count)
        )
        rank, world = trainer.global_rank, trainer.world_size
        workers = cfg.resolved_workers(gpu, world_size=max(1, world // cfg.num_nodes))
        if trainer.is_global_zero:
            log.info(
                "start-up: imports %.1f s, data %.1f s (%s), model %.1f s; %d loader workers, %s%s%s%s",
                entered - STARTED,
                data_ready - entered,
                data_note,
                time.perf_counter() - data_ready,
                workers,
                precision,
                ", channels_last" if module.channels_last else "",
                ", torch.compile" if module.compiled else "",
                f", {world} processes (DDP)" if world > 1 else "",
            )
        resume = _checkpoints.resumable(folder) if persistent else None
        if resume and trainer.is_global_zero:
            log.info("resuming from epoch %d of %d (checkpoint %s)", resume[1] + 1, cfg.epochs, resume[0])
        fit_started = time.perf_counter()
        trainer.fit(
            module,
            train_dataloaders=_loader(train_set, cfg, params.seed, workers, True, rank, world),
            val_dataloaders=_loader(val_set, cfg, params.seed, workers, False, rank, world) if len(val_set) else None,
            ckpt_path=resume[0] if resume else None,
            weights_only=True,  # tensors and plain values only: loading a checkpoint runs no pickled code
        )
        fit_seconds = time.perf_counter() - fit_started
        summary = {
            "seed": params.seed,
            "epochs": trainer.current_epoch,
            "precision": precision,
            "train_images": len(train_set),
            "val_images": len(val_set),
        }
        if trainer.early_stopping_callback is not None and trainer.early_stopping_callback.stopped_epoch:
            summary["stopped_early"] = True
        if checkpoint.monitor and checkpoint.best_model_path:
            best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
            module.load_state_dict(best["state_dict"])
            summary["monitor"] = cfg.monitor
            summary["best_score"] = round(float(checkpoint.best_model_score), 6)
            if cfg.monitor == "val/iou_macro":
                summary["best_val_iou_macro"] = summary["best_score"]
            summary["best_epoch"] = int(best["epoch"]) + 1
        if world > 1:
            broadcast_buffers(module.model)
            log.info("rank %d of %d: final weights sha256 %s", rank, world, weights_digest(module.model))

    if trainer.is_global_zero:
        # A plain copy of the trained weights: no compile wrapper, default memory format, whatever the run used.
        plain = _model.build(cfg, num_classes, channels)
        plain.load_state_dict(module.model.state_dict())
        summary.update(_model.size(plain, channels, params.augment.crop_size))
        if live is not None:
            # Wall time of this process's fit (a resumed run counts only the epochs it ran): for comparisons.
            live.summary.setdefault("perf", {})["fit_s"] = round(fit_seconds, 2)
            live.summary["model"] = {k: summary[k] for k in ("parameters", "gmacs")}
            live.make_summary()
        # Only the augment keys dvc.yaml lists for this stage (the contract test checks).
        card = _model.ModelCard(
            arch=cfg.arch,
            encoder=cfg.encoder,
            encoder_depth=cfg.encoder_depth,
            decoder_channels=cfg.decoder_channels,
            in_channels=channels,
            classes=params.classes,
            mean=list(mean),
            std=list(std),
            pixel_transforms=list(params.augment.eval),
            pad_divisor=params.augment.pad_divisor,
            train_size=params.augment.crop_size,
            training=summary,
        )
        _model.save(plain, card, paths.augment / EVAL_PIPELINE, paths.train / MODEL_DIR, export=params.register.export)
        log.info("model saved to %s (%s)", paths.train / MODEL_DIR, summary)
        if persistent:
            _checkpoints.finished(folder)
    return summary


def main() -> None:
    stage_main(functools.partial(run, checkpoint_root=CHECKPOINTS), "train")


if __name__ == "__main__":
    main()
