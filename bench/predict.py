"""Prediction throughput: PyTorch against the ONNX export, on the demo model's architecture.

Side by side, in one run: the model params.yaml describes (its weights do not
change the arithmetic, so a seeded random init stands in for a trained one)
is saved with its ONNX export exactly as the train stage saves it, then loaded
back through the model card (sha256-checked) and run by the same
:class:`segflow.semantic.infer.Predictor` that ``segflow predict`` and the evaluate stage
use: whole 512x512 images (one forward each) and a 2048x2048 image (blended
tiles of ``predict.tile_size`` with ``predict.overlap``). Each backend gets a
warm-up image first; the figures are the median of ``repeats`` timed passes.
The two backends' class maps are compared pixel by pixel as well.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

from bench._util import ROOT

TITLE = "Predict: images per second, PyTorch and ONNX Runtime"


def _model(work: Path):
    import torch

    from segflow.params import load_params
    from segflow.semantic.card import ModelCard
    from segflow.semantic.factory import build
    from segflow.semantic.store import load, save

    params = load_params(ROOT / "params.yaml")
    torch.manual_seed(0)
    classes = params.classes
    model = build(params.train, len(classes))
    preprocess = work / "preprocess.json"
    preprocess.write_text("{}\n")
    card = ModelCard(
        arch=params.train.arch,
        encoder=params.train.encoder,
        encoder_depth=params.train.encoder_depth,
        decoder_channels=list(params.train.decoder_channels),
        classes=list(classes),
        in_channels=3,
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
        pad_divisor=params.augment.pad_divisor,
        train_size=params.augment.crop_size,
    )
    save(model, card, preprocess, work / "model", export=["onnx"])
    model, card = load(work / "model")
    return model, card, params.predict


def _time(predictor, images: list[np.ndarray], repeats: int) -> tuple[float, list[np.ndarray]]:
    predictor.predict(images[0])  # warm-up: allocations, kernels, the session's first run
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        masks = [predictor.predict(image) for image in images]
        times.append(time.perf_counter() - start)
    return statistics.median(times), masks


def run(work: Path, repeats: int = 3, small: int = 8) -> str:
    """Measure; return the markdown section for docs/benchmarks.md."""
    import torch

    from segflow.semantic.infer import Predictor, onnx_forward, torch_forward
    from segflow.semantic.store import verify

    work.mkdir(parents=True, exist_ok=True)
    model, card, cfg = _model(work)
    rng = np.random.default_rng(0)
    whole = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(small)]
    large = [rng.integers(0, 256, (2048, 2048, 3), dtype=np.uint8)]
    backends = {
        "PyTorch (eager, fp32)": torch_forward(model, "cpu"),
        "ONNX Runtime (CPU)": onnx_forward(verify(work / "model", card, "onnx")),
    }
    rows, results = [], {}
    for name, forward in backends.items():
        predictor = Predictor(forward, card, cfg.tile_size, cfg.overlap, cfg.batch_size)
        secs_small, masks_small = _time(predictor, whole, repeats)
        secs_large, masks_large = _time(predictor, large, repeats)
        results[name] = masks_small + masks_large
        rows.append((name, small / secs_small, secs_small / small, secs_large))
    first, second = results.values()
    agree = np.mean([np.mean(a == b) for a, b in zip(first, second, strict=True)])
    base = rows[0][1]
    table = [
        "| backend | 512x512 images/s | s per 512x512 image | s per 2048x2048 image (tiled) | vs PyTorch |",
        "|---|---:|---:|---:|---:|",
        *[f"| {n} | {ips:.2f} | {per:.3f} | {big:.2f} | {ips / base:.2f}x |" for n, ips, per, big in rows],
    ]
    tiles = len(list(Predictor(lambda b: b, card, cfg.tile_size, cfg.overlap)._windows(2048, 2048)))
    return "\n".join(
        [
            *table,
            "",
            f"Model: {card.arch} / {card.encoder} (depth {card.encoder_depth}), {len(card.classes)} classes, "
            f"from params.yaml. Tiles: {cfg.tile_size} px, overlap {cfg.overlap}, batch {cfg.batch_size} "
            f"({tiles} tiles for 2048x2048). torch threads {torch.get_num_threads()}, "
            f"{os.cpu_count()} CPUs. Same class on {agree:.4%} of pixels across the two backends.",
        ]
    )
