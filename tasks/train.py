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

import logging
import os
import sys

import lightning as L
import segmentation_models_pytorch as smp
import torch
from dvclive import Live
from dvclive.lightning import DVCLiveLogger
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from tasks import _guard, _metrics, _model
from tasks._callbacks import EpochLog
from tasks._common import SegflowError, stage_main
from tasks._data import SeededSampler, SegmentationDataset, same_shape_batches
from tasks._files import (
    EVAL_PIPELINE,
    LIVE_DIR,
    MODEL_DIR,
    TRAIN_PIPELINE,
    image_channels,
    load_transform,
    read_manifest,
    split_rows,
)
from tasks.params import IGNORE_INDEX, Params, Paths, TrainParams, available_cores

log = logging.getLogger(__name__)

MONITOR = "val/iou_macro"


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
    """Lightning wrapper: loss, AdamW with a one-cycle schedule, validation IoU/Dice.

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
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(images))
        return loss

    def validation_step(self, batch, batch_idx):
        images, masks, _ = batch
        logits = self(images)
        self.log("val/loss", self.loss(logits, masks), on_epoch=True, prog_bar=True, batch_size=len(images))
        counts = torch.stack([c.sum(0) for c in _metrics.confusion_counts(logits.argmax(1), masks, len(self.classes))])
        # Summed on the device: no copy to the host (and no wait for the GPU) per batch.
        self._val_totals = counts if self._val_totals is None else self._val_totals + counts

    def on_validation_epoch_end(self):
        if self._val_totals is None:
            return
        # One process (params allow train.devices: 1 only), so these are all the counts.
        totals, self._val_totals = self._val_totals.cpu(), None
        summary = _metrics.summarize(*(t[None] for t in totals), self.classes)
        logged = {"val/iou_macro": summary["iou"]["macro"], "val/dice_macro": summary["dice"]["macro"]}
        logged.update({f"val/iou_{c}": v for c, v in summary["iou"]["per_class"].items() if v is not None})
        self.log_dict({k: float(v or 0.0) for k, v in logged.items()}, prog_bar=False, sync_dist=False)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.parameters(),
            lr=self.cfg.lr,
            weight_decay=self.cfg.weight_decay,
            fused=self.device.type == "cuda",  # one kernel for the whole update instead of one per tensor
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.cfg.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


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


def _loader(dataset: SegmentationDataset, params: TrainParams, seed: int, workers: int, train: bool) -> DataLoader:
    common = {
        "num_workers": workers,
        "persistent_workers": workers > 0,  # workers (and the cache they share) live for the whole run
        "prefetch_factor": 4 if workers else None,
        "pin_memory": torch.cuda.is_available(),
    }
    if not train:
        # Full images, padded to the model's stride; batches group images of one size.
        return DataLoader(dataset, batch_sampler=same_shape_batches(dataset.rows, params.batch_size), **common)
    return DataLoader(
        dataset,
        batch_size=params.batch_size,
        sampler=SeededSampler(len(dataset), seed),
        drop_last=len(dataset) > params.batch_size,  # a lone 1-image last batch upsets BatchNorm
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


def run(params: Params, paths: Paths) -> dict:
    """Train and save the model under ``paths.train``.

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
    workers = cfg.resolved_workers(gpu)
    module = SegmentationModule(
        _model.build(cfg, num_classes, channels),
        cfg,
        params.classes,
        channels_last=cfg.use_channels_last(gpu),
        compile=cfg.compile,
    )
    precision = resolve_precision(cfg.precision, cfg.accelerator)
    live_dir = paths.train / LIVE_DIR
    live = _StageLive(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    logger = DVCLiveLogger(experiment=live, log_model=False)
    log.info(
        "start-up: imports %.1f s, data %.1f s (%s), model %.1f s; %d loader workers, %s%s%s",
        entered - STARTED,
        data_ready - entered,
        data_note,
        time.perf_counter() - data_ready,
        workers,
        precision,
        ", channels_last" if module.channels_last else "",
        ", torch.compile" if module.compiled else "",
    )

    with _guard.scratch("train") as scratch:
        checkpoint = ModelCheckpoint(dirpath=scratch, monitor=MONITOR, mode="max", save_top_k=1, save_weights_only=True)
        trainer = L.Trainer(
            max_epochs=cfg.epochs,
            deterministic=cfg.deterministic,
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            precision=precision,
            logger=logger,
            callbacks=[EpochLog(STARTED), *([checkpoint] if len(val_set) else [])],
            enable_checkpointing=bool(len(val_set)),
            default_root_dir=scratch,
            log_every_n_steps=1,
            num_sanity_val_steps=0,
            enable_progress_bar=sys.stderr.isatty(),
            enable_model_summary=False,
            benchmark=gpu and not cfg.deterministic,  # crops have one size: cuDNN's autotuned kernels pay off
        )
        trainer.fit(
            module,
            train_dataloaders=_loader(train_set, cfg, params.seed, workers, train=True),
            val_dataloaders=_loader(val_set, cfg, params.seed, workers, train=False) if len(val_set) else None,
        )
        summary = {
            "seed": params.seed,
            "epochs": trainer.current_epoch,
            "precision": precision,
            "train_images": len(train_set),
            "val_images": len(val_set),
        }
        if len(val_set) and checkpoint.best_model_path:
            best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
            module.load_state_dict(best["state_dict"])
            summary["best_val_iou_macro"] = round(float(checkpoint.best_model_score), 6)
            summary["best_epoch"] = int(best["epoch"])

    if trainer.is_global_zero:
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
            pad_divisor=params.augment.pad_divisor,
            train_size=params.augment.crop_size,
            training=summary,
        )
        _model.save(
            module.model, card, paths.augment / EVAL_PIPELINE, paths.train / MODEL_DIR, export=params.register.export
        )
        log.info("model saved to %s (%s)", paths.train / MODEL_DIR, summary)
    return summary


def main() -> None:
    stage_main(run, "train")


if __name__ == "__main__":
    main()
