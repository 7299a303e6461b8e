"""The train stage's work for ``task: instance``: fit Mask R-CNN with Lightning, log with DVCLive, save it.

Reads the manifest and ``instances.csv`` (``${paths.ingest}``) and the saved pipelines
(``${paths.augment}``); writes ``${paths.train}/model/`` (weights as safetensors, ``model.json`` card
with ``task: instance``, ``preprocess.json``) and DVCLive's metrics and plots (each loss term) under
``${paths.train}/live/``. The kept weights are the validated epoch's with the best ``train.monitor``
(COCO mask AP on the validation split by default), the last epoch's without a validation split.
Resumable per-epoch checkpoints are keyed to the params, the data and this family's code.
"""

from __future__ import annotations

import contextlib
import json
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
from segflow.instance import card as cards
from segflow.instance.dataset import InstanceDataset, collate, objects_by_image
from segflow.instance.model import build, load_weights
from segflow.instance.module import InstanceModule
from segflow.layout import (
    EVAL_PIPELINE,
    INSTANCES,
    LIVE_DIR,
    MANIFEST,
    MODEL_DIR,
    REPORT_JSON,
    TRAIN_PIPELINE,
    image_channels,
    load_transform,
    read_instance_table,
    read_manifest,
    split_rows,
)
from segflow.params import InstanceParams, Paths, available_cores
from segflow.semantic.dataset import SeededSampler
from segflow.training import checkpoints
from segflow.training.hardware import broadcast_buffers, check_accelerator, on_gpu, resolve_precision, weights_digest
from segflow.training.stage import StageLive, build_callbacks, fit_summary, keep_best, make_trainer, stop_summary

log = logging.getLogger(__name__)


def _run_key(params: InstanceParams, paths: Paths) -> str:
    keyed = {
        "seed": params.seed,
        "classes": params.classes,
        "normalize": [params.augment.normalize.mean, params.augment.normalize.std],
        "geometry": [params.augment.crop_size, params.augment.min_instance_area],
        "train": params.train.model_dump(mode="json", exclude=set(checkpoints.SPEED_ONLY)),
    }
    inputs = [paths.ingest / MANIFEST, paths.ingest / INSTANCES, paths.augment / TRAIN_PIPELINE]
    return checkpoints.run_key(keyed, inputs, code_files("segflow.instance.train"))


def category_ids(ingest: Path, classes: list[str]) -> list[int]:
    """Each class's COCO ``category_id``: the annotation file's own when ingest read one (so predict's
    COCO JSON uses the ids the user's tools know), else 1, 2, ... in ``classes`` order."""
    report = ingest / REPORT_JSON
    source = json.loads(report.read_text(encoding="utf-8")).get("source", {}) if report.is_file() else {}
    found = source.get("category_ids", {})
    if set(found) == set(classes):
        return [int(found[name]) for name in classes]
    return list(range(1, len(classes) + 1))


def _loader(dataset: InstanceDataset, batch_size: int, seed: int, workers: int, train: bool, rank=0, world=1):
    common = {
        "num_workers": workers,
        "persistent_workers": workers > 0,
        "collate_fn": collate,
        "pin_memory": torch.cuda.is_available(),
    }
    if not train:
        shard = list(range(rank, len(dataset), world))
        batches = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
        return DataLoader(dataset, batch_sampler=batches, **common)
    per_process = math.ceil(len(dataset) / world)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=SeededSampler(len(dataset), seed, rank=rank, world=world),
        drop_last=per_process > batch_size,  # a lone 1-image batch upsets BatchNorm
        **common,
    )


def run(
    params: InstanceParams, paths: Paths, checkpoint_root: Path | None = None, started: float | None = None
) -> dict:
    """Train and save the instance model under ``paths.train``; returns the training summary (also in the card)."""
    cfg = params.train
    check_accelerator(cfg.accelerator)
    entered = time.perf_counter()
    started = entered if started is None else started
    L.seed_everything(params.seed, workers=True, verbose=False)
    manifest = read_manifest(paths.ingest)
    objects = objects_by_image(read_instance_table(paths.ingest), params.classes)
    train_rows = split_rows(manifest, "train")
    val_rows = split_rows(manifest, "val", required=False)
    channels = image_channels(manifest)
    mean, std = params.augment.normalize.for_channels(channels)
    area = params.augment.min_instance_area
    train_set = InstanceDataset(
        paths.ingest, train_rows, objects, load_transform(paths.augment / TRAIN_PIPELINE, params.seed), area
    )
    val_set = InstanceDataset(paths.ingest, val_rows, objects, load_transform(paths.augment / EVAL_PIPELINE), 1)
    need = train_set.decoded_bytes() + val_set.decoded_bytes()
    cached = bool(cfg.cache_mb) and need <= cfg.cache_mb * 2**20
    for dataset in (train_set, val_set) if cached else ():
        dataset.preload(cfg.cache_mb * 2**20, threads=available_cores())
    data_ready = time.perf_counter()

    crop = params.augment.crop_size
    # The pipelines normalise (train.json / eval.json end with Normalize): the model's own transform does not.
    model = build(
        cfg.encoder,
        len(params.classes),
        crop,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        mean=[0.0] * 3,
        std=[1.0] * 3,
        detections=cfg.val_detections,
        score_threshold=0.05,
        rpn_post_nms_top_n=cfg.rpn_post_nms_top_n,
        width=cfg.width,
        rois_per_image=cfg.rois_per_image,
        anchor_size=cfg.anchor_size,
    )
    loaded = load_weights(model, cfg.encoder_weights) if cfg.encoder_weights else "random init"
    module = InstanceModule(model, cfg, params.classes, mask_threshold=0.5)
    precision = resolve_precision(cfg.precision, cfg.accelerator)
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*", category=UserWarning)
    gpu = on_gpu(cfg.accelerator)
    persistent = checkpoint_root is not None and cfg.resume
    with contextlib.ExitStack() as stack:
        if persistent:
            key = _run_key(params, paths)
            primary = rank_zero_only.rank == 0
            folder = checkpoints.folder(checkpoint_root, key) if primary else checkpoint_root / f"train-{key}"
        else:
            folder = stack.enter_context(stage.scratch("train"))
        callbacks, checkpoint = build_callbacks(cfg, folder, bool(len(val_set)), started)
        live = None
        if rank_zero_only.rank == 0:
            live = StageLive(dir=str(paths.train / LIVE_DIR), dvcyaml=None, save_dvc_exp=False, report=None)
        trainer = make_trainer(cfg, folder, callbacks, live, precision, cfg.strategy)
        rank, world = trainer.global_rank, trainer.world_size
        workers = cfg.resolved_workers(gpu, world_size=max(1, world // cfg.num_nodes))
        if trainer.is_global_zero:
            log.info(
                "start-up: imports %.1f s, data %.1f s (%d images%s), model %.1f s (Mask R-CNN, %s FPN, %s); "
                "%d loader workers, %s%s",
                entered - started,
                data_ready - entered,
                len(train_set) + len(val_set),
                " decoded once and cached" if cached else ", decoded every epoch",
                time.perf_counter() - data_ready,
                cfg.encoder,
                loaded,
                workers,
                precision,
                f", {world} processes (DDP)" if world > 1 else "",
            )
        resume = checkpoints.resumable(folder) if persistent else None
        if resume and trainer.is_global_zero:
            log.info("resuming from epoch %d of %d (checkpoint %s)", resume[1] + 1, cfg.epochs, resume[0])
        fit_started = time.perf_counter()
        trainer.fit(
            module,
            train_dataloaders=_loader(train_set, cfg.batch_size, params.seed, workers, True, rank, world),
            val_dataloaders=(
                _loader(val_set, cfg.batch_size, params.seed, workers, False, rank, world) if len(val_set) else None
            ),
            ckpt_path=resume[0] if resume else None,
            weights_only=True,
        )
        fit_seconds = time.perf_counter() - fit_started
        summary = fit_summary(params.seed, trainer, precision, len(train_set), len(val_set), cfg)
        summary["weights_init"] = loaded
        summary.update(stop_summary(cfg, trainer, callbacks))
        summary.update(keep_best(module, checkpoint, cfg))
        if world > 1:
            broadcast_buffers(module.model)
            log.info("rank %d of %d: final weights sha256 %s", rank, world, weights_digest(module.model))

    if trainer.is_global_zero:
        summary["parameters"] = sum(p.numel() for p in module.model.parameters())
        if live is not None:
            live.summary.setdefault("perf", {})["fit_s"] = round(fit_seconds, 2)
            live.summary["model"] = {"parameters": summary["parameters"]}
            live.summary["epoch"] = trainer.current_epoch
            live.make_summary()
        card = cards.InstanceCard(
            encoder=cfg.encoder,
            in_channels=channels,
            classes=params.classes,
            category_ids=category_ids(paths.ingest, params.classes),
            mean=list(mean),
            std=list(std),
            pixel_transforms=list(params.augment.eval),
            pad_divisor=params.augment.pad_divisor,
            train_size=crop,
            min_size=cfg.min_size,
            max_size=cfg.max_size,
            width=cfg.width,
            anchor_size=cfg.anchor_size,
            training=summary,
        )
        cards.save(module.model, card, paths.augment / EVAL_PIPELINE, paths.train / MODEL_DIR)
        log.info("model saved to %s (%s)", paths.train / MODEL_DIR, summary)
        if persistent:
            checkpoints.finished(folder)
    return summary
