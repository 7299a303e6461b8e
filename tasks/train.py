"""Stage ``train``: fit an smp model with Lightning, log with DVCLive, save it.

Reads the manifest (``${paths.ingest}``) and the saved pipelines
(``${paths.augment}``). Writes ``${paths.train}/model/`` (weights as
safetensors, ``model.json`` card, ``preprocess.json``) and DVCLive's metrics
and plots under ``${paths.train}/live/``. The weights kept are those of the
epoch with the best validation macro IoU (the last epoch when there is no
validation split).
"""

from __future__ import annotations

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
from tasks._data import SegmentationDataset, same_shape_batches, seed_worker
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
from tasks.params import IGNORE_INDEX, Params, Paths, TrainParams

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
    """Lightning wrapper: loss, AdamW with a one-cycle schedule, validation IoU/Dice."""

    def __init__(self, model: torch.nn.Module, params: TrainParams, classes: list[str]):
        super().__init__()
        self.model = model
        self.loss = build_loss(params.loss)
        self.cfg = params
        self.classes = classes
        self._val_counts: list[tuple[torch.Tensor, ...]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, masks, _ = batch
        loss = self.loss(self(images), masks)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(images))
        return loss

    def validation_step(self, batch, batch_idx):
        images, masks, _ = batch
        logits = self(images)
        self.log("val/loss", self.loss(logits, masks), on_epoch=True, prog_bar=True, batch_size=len(images))
        counts = _metrics.confusion_counts(logits.argmax(1), masks, len(self.classes))
        self._val_counts.append(tuple(c.cpu() for c in counts))

    def on_validation_epoch_end(self):
        if not self._val_counts:
            return
        # One process (params allow train.devices: 1 only), so these are all the counts.
        counts = [torch.cat(parts) for parts in zip(*self._val_counts, strict=True)]
        self._val_counts.clear()
        summary = _metrics.summarize(*counts, self.classes)
        logged = {"val/iou_macro": summary["iou"]["macro"], "val/dice_macro": summary["dice"]["macro"]}
        logged.update({f"val/iou_{c}": v for c, v in summary["iou"]["per_class"].items() if v is not None})
        self.log_dict({k: float(v or 0.0) for k, v in logged.items()}, prog_bar=False, sync_dist=False)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
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


def _loader(dataset: SegmentationDataset, params: TrainParams, seed: int, train: bool) -> DataLoader:
    common = {
        "num_workers": params.num_workers,
        "worker_init_fn": seed_worker if params.num_workers else None,
        "persistent_workers": params.num_workers > 0,
        "pin_memory": torch.cuda.is_available(),
    }
    if not train:
        # Full images, padded to the model's stride; batches group images of one size.
        return DataLoader(dataset, batch_sampler=same_shape_batches(dataset.rows, params.batch_size), **common)
    return DataLoader(
        dataset,
        batch_size=params.batch_size,
        shuffle=True,
        drop_last=len(dataset) > params.batch_size,  # a lone 1-image last batch upsets BatchNorm
        generator=torch.Generator().manual_seed(seed),
        **common,
    )


def run(params: Params, paths: Paths) -> dict:
    """Train and save the model under ``paths.train``.

    Returns:
        Training summary (also stored in the model card's ``training`` field).
    """
    cfg = params.train
    check_accelerator(cfg.accelerator)
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

    module = SegmentationModule(_model.build(cfg, num_classes, channels), cfg, params.classes)
    precision = resolve_precision(cfg.precision, cfg.accelerator)
    live_dir = paths.train / LIVE_DIR
    live = _StageLive(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    logger = DVCLiveLogger(experiment=live, log_model=False)

    with _guard.scratch("train") as scratch:
        checkpoint = ModelCheckpoint(dirpath=scratch, monitor=MONITOR, mode="max", save_top_k=1, save_weights_only=True)
        trainer = L.Trainer(
            max_epochs=cfg.epochs,
            deterministic=cfg.deterministic,
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            precision=precision,
            logger=logger,
            callbacks=[EpochLog(), *([checkpoint] if len(val_set) else [])],
            enable_checkpointing=bool(len(val_set)),
            default_root_dir=scratch,
            log_every_n_steps=1,
            num_sanity_val_steps=0,
            enable_progress_bar=sys.stderr.isatty(),
            enable_model_summary=False,
        )
        trainer.fit(
            module,
            train_dataloaders=_loader(train_set, cfg, params.seed, train=True),
            val_dataloaders=_loader(val_set, cfg, params.seed, train=False) if len(val_set) else None,
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
