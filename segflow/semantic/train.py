"""The train stage's work: fit a semantic model with Lightning, log with DVCLive, save it.

Reads the manifest (``${paths.ingest}``) and the saved pipelines
(``${paths.augment}``). Writes ``${paths.train}/model/`` (weights as
safetensors, ``model.json`` card, ``preprocess.json``) and DVCLive's metrics
and plots under ``${paths.train}/live/``. The weights kept are those of the
validated epoch with the best validation macro IoU (the last epoch when there
is no validation split). Resumable per-epoch checkpoints are keyed to the params,
the input data and the library files this module imports.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from segflow import stage
from segflow.deps import code_files
from segflow.errors import SegflowError
from segflow.layout import (
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
from segflow.params import Params, Paths, TrainParams, available_cores
from segflow.semantic import factory, losses, measure, store
from segflow.semantic.card import ModelCard
from segflow.semantic.dataset import SeededSampler, SegmentationDataset, same_shape_batches
from segflow.semantic.module import SegmentationModule
from segflow.training import checkpoints
from segflow.training.hardware import (
    _strategy,
    broadcast_buffers,
    check_accelerator,
    on_gpu,
    resolve_precision,
    weights_digest,
)
from segflow.training.stage import StageLive, build_callbacks, fit_summary, keep_best, make_trainer, stop_summary

log = logging.getLogger(__name__)


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
    train = params.train.model_dump(mode="json", exclude=set(checkpoints.SPEED_ONLY))
    keyed = {
        "seed": params.seed,
        "classes": params.classes,
        "normalize": [params.augment.normalize.mean, params.augment.normalize.std],
        "geometry": [params.augment.pad_divisor, params.augment.crop_size],
        "train": train,
    }
    inputs = [paths.ingest / MANIFEST, paths.augment / TRAIN_PIPELINE, paths.augment / EVAL_PIPELINE]
    return checkpoints.run_key(keyed, inputs, code_files("segflow.semantic.train"))


def _class_weights(cfg: TrainParams, train_rows, classes: list[str]) -> list[float] | None:
    """The loss's class weights ``train.class_weights`` stands for: None, the list, or median frequency
    balancing from the training split's pixel counts (ingest's ``px_<class>`` manifest columns).

    Raises:
        SegflowError: a list of the wrong length; median_frequency with a class absent from the training
            split, or with a manifest without pixel counts.
    """
    spec = cfg.class_weights
    if spec is None:
        return None
    if spec != "median_frequency":
        if len(spec) != len(classes):
            raise SegflowError(
                f"train.class_weights has {len(spec)} weights but there are {len(classes)} classes {classes}; "
                "give one weight per class, in class order"
            )
        return list(spec)
    columns = [f"px_{name}" for name in classes]
    missing = [column for column in columns if column not in train_rows.columns]
    if missing:
        raise SegflowError(
            f"{train_rows.attrs.get('path', MANIFEST)}: no pixel counts per class ({', '.join(missing)}) for "
            "train.class_weights: median_frequency; rerun dvc repro ingest"
        )
    return losses.median_frequency(train_rows[columns].to_numpy(), classes)


def run(params: Params, paths: Paths, checkpoint_root: Path | None = None, started: float | None = None) -> dict:
    """Train and save the model under ``paths.train``.

    Args:
        checkpoint_root: where resumable per-epoch checkpoints are kept (the stage passes
            ``.segflow/checkpoints``); None keeps them in a scratch folder removed at the end.
        started: ``time.perf_counter()`` when the stage process started, before its imports (start-up is
            reported from there); None: now.

    Returns:
        Training summary (also stored in the model card's ``training`` field).
    """
    cfg = params.train
    check_accelerator(cfg.accelerator)
    entered = time.perf_counter()
    started = entered if started is None else started
    L.seed_everything(params.seed, workers=True, verbose=False)
    manifest = read_manifest(paths.ingest)
    train_rows = split_rows(manifest, "train")
    val_rows = split_rows(manifest, "val", required=False)
    num_classes = len(params.classes)
    class_weights = _class_weights(cfg, train_rows, params.classes)
    channels = image_channels(manifest)
    mean, std = params.augment.normalize.for_channels(channels)
    train_set = SegmentationDataset(
        paths.ingest, train_rows, load_transform(paths.augment / TRAIN_PIPELINE, params.seed)
    )
    val_set = SegmentationDataset(paths.ingest, val_rows, load_transform(paths.augment / EVAL_PIPELINE))
    data_note = _prepare_data([train_set, val_set], cfg.cache_mb)
    data_ready = time.perf_counter()

    gpu = on_gpu(cfg.accelerator)
    precision = resolve_precision(cfg.precision, cfg.accelerator)
    module = SegmentationModule(
        factory.build(cfg, num_classes, channels),
        cfg,
        params.classes,
        channels_last=cfg.use_channels_last(gpu, precision),
        compile=cfg.compile,
        class_weights=class_weights,
    )
    # Under DDP the validation scores are computed from counts already summed over processes and the perf
    # figures are rank 0's: Lightning's advice to sync each of them again does not apply.
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*", category=UserWarning)
    persistent = checkpoint_root is not None and cfg.resume
    with contextlib.ExitStack() as stack:
        if persistent:
            key = _run_key(params, paths)
            primary = rank_zero_only.rank == 0  # only rank 0 prunes; the others use the same folder
            folder = checkpoints.folder(checkpoint_root, key) if primary else checkpoint_root / f"train-{key}"
        else:
            folder = stack.enter_context(stage.scratch("train"))
        callbacks, checkpoint = build_callbacks(cfg, folder, bool(len(val_set)), started)
        live = None
        if rank_zero_only.rank == 0:  # other DDP processes write nothing
            live = StageLive(dir=str(paths.train / LIVE_DIR), dvcyaml=None, save_dvc_exp=False, report=None)
        trainer = make_trainer(
            cfg,
            folder,
            callbacks,
            live,
            precision,
            _strategy(cfg, module.model, channels, params.augment.pad_divisor),
            benchmark=gpu and not cfg.deterministic,  # crops have one size: cuDNN's autotuned kernels pay off
        )
        rank, world = trainer.global_rank, trainer.world_size
        workers = cfg.resolved_workers(gpu, world_size=max(1, world // cfg.num_nodes))
        if trainer.is_global_zero:
            log.info(
                "start-up: imports %.1f s, data %.1f s (%s), model %.1f s; %d loader workers, %s%s%s%s",
                entered - started,
                data_ready - entered,
                data_note,
                time.perf_counter() - data_ready,
                workers,
                precision,
                ", channels_last" if module.channels_last else "",
                ", torch.compile" if module.compiled else "",
                f", {world} processes (DDP)" if world > 1 else "",
            )
            if class_weights is not None:
                log.info(
                    "class weights (%s) for the loss's %s term: %s",
                    "median frequency of the train split" if cfg.class_weights == "median_frequency" else "given",
                    "focal" if cfg.loss.startswith("focal") else "cross-entropy",
                    ", ".join(
                        f"{name} {weight:.4g}" for name, weight in zip(params.classes, class_weights, strict=True)
                    ),
                )
        resume = checkpoints.resumable(folder) if persistent else None
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
        summary = fit_summary(params.seed, trainer, precision, len(train_set), len(val_set), cfg)
        if class_weights is not None:
            summary["class_weights"] = {
                "method": "median_frequency" if cfg.class_weights == "median_frequency" else "given",
                "weights": {name: round(w, 6) for name, w in zip(params.classes, class_weights, strict=True)},
            }
        summary.update(stop_summary(cfg, trainer, callbacks))
        summary.update(
            keep_best(module, checkpoint, cfg, "best_val_iou_macro" if cfg.monitor == "val/iou_macro" else None)
        )
        if world > 1:
            broadcast_buffers(module.model)
            log.info("rank %d of %d: final weights sha256 %s", rank, world, weights_digest(module.model))

    if trainer.is_global_zero:
        # A plain copy of the trained weights: no compile wrapper, default memory format, whatever the run used.
        plain = factory.build(cfg, num_classes, channels)
        plain.load_state_dict(module.model.state_dict())
        summary.update(measure.size(plain, channels, params.augment.crop_size))
        if live is not None:
            # Wall time of this process's fit (a resumed run counts only the epochs it ran): for comparisons.
            live.summary.setdefault("perf", {})["fit_s"] = round(fit_seconds, 2)
            live.summary["model"] = {k: summary[k] for k in ("parameters", "gmacs")}
            # Epochs trained, counted as the log counts them ("epoch 4/4" -> 4): Lightning's own "epoch" is
            # the last epoch's 0-based index.
            live.summary["epoch"] = trainer.current_epoch
            live.make_summary()
        # Only the augment keys dvc.yaml lists for this stage (the contract test checks).
        card = ModelCard(
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
        store.save(plain, card, paths.augment / EVAL_PIPELINE, paths.train / MODEL_DIR)
        log.info("model saved to %s (%s)", paths.train / MODEL_DIR, summary)
        if persistent:
            checkpoints.finished(folder)
    return summary
