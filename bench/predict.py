"""Prediction throughput: PyTorch against the ONNX export, on the demo model's architecture.

Side by side, in one run: the model params.yaml describes (its weights do not
change the arithmetic, so a seeded random init stands in for a trained one)
is saved as the train stage saves it and exported as the export stage does, then loaded
back through the model card (sha256-checked) and run by the same
:class:`segflow.semantic.infer.Predictor` that ``segflow predict`` and the evaluate stage
use: whole 512x512 images (one forward each) and a 2048x2048 image (blended
tiles of ``predict.tile_size`` with ``predict.overlap``). Each backend gets a
warm-up image first; the figures are the median of ``repeats`` timed passes.
The two backends' class maps are compared pixel by pixel as well.

:func:`memory` measures what ``segflow predict`` holds for large images: a
synthetic RGB PNG of each size, predicted by ``segflow.semantic.predict.run``
in a fresh subprocess, whole (as before: decode, predict, write) and streamed
(strips in, rows out), side by side; the peak RSS is the child's VmHWM, and
"above the model" is that less the VmHWM it had after loading the model and
running one batch of tiles. The demo model is too slow on a small CPU for the
largest images, so those run a one-layer convolution of the same input and
output shape: memory, not arithmetic, is what is measured there.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench._util import ROOT

TITLE = "Predict: images per second, PyTorch and ONNX Runtime"


def _model(work: Path, onnx: bool = True):
    """The demo model's architecture, seeded, saved (with its ONNX export when ``onnx``) and loaded back."""
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
    save(model, card, preprocess, work / "model")
    if onnx:
        from segflow.semantic.export import write

        write(work / "model", work / "export", ["onnx"])
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


def run(work: Path, repeats: int = 3, small: int = 8, memory_sizes: tuple[int, ...] = (2048, 6000, 12000)) -> str:
    """Measure; return the markdown section for docs/benchmarks.md (throughput, then :func:`memory`'s table)."""
    return _throughput(work, repeats, small) + "\n\n" + memory(work / "memory", memory_sizes)


def _throughput(work: Path, repeats: int, small: int) -> str:
    import torch

    from segflow.semantic.card import read_card
    from segflow.semantic.infer import Predictor, onnx_forward, torch_forward
    from segflow.semantic.store import verify

    work.mkdir(parents=True, exist_ok=True)
    model, card, cfg = _model(work)
    rng = np.random.default_rng(0)
    whole = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(small)]
    large = [rng.integers(0, 256, (2048, 2048, 3), dtype=np.uint8)]
    backends = {
        "PyTorch (eager, fp32)": torch_forward(model, "cpu"),
        "ONNX Runtime (CPU)": onnx_forward(verify(work / "export", read_card(work / "export"), "onnx")),
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


#: The largest image side measured with the demo model itself (above it: a one-layer convolution).
MODEL_UP_TO = 6000


def _synthetic_png(path: Path, side: int, seed: int = 0) -> None:
    """An RGB PNG of ``side`` x ``side``, written a strip at a time (the bench never holds it whole).

    Smooth colour gradients with blobs and a little noise, so it compresses as photographs do, roughly.
    """
    from segflow.pngstream import PngWriter

    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, side, (32, 2))
    x = np.arange(side, dtype=np.float32)
    with PngWriter(path, side, side, channels=3, level=1) as writer:
        for top in range(0, side, 256):
            y = np.arange(top, min(top + 256, side), dtype=np.float32)[:, None]
            blobs = np.zeros((len(y), side), dtype=np.float32)
            for cy, cx in centres:
                blobs += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * (side / 20) ** 2))
            rgb = np.stack([x * 255 / side + 0 * y, y * 255 / side + 0 * x, 255 * np.minimum(blobs, 1)], axis=-1)
            rgb += rng.normal(0, 4, rgb.shape)
            writer.write(np.clip(rgb, 0, 255).astype(np.uint8))


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _peak(argv: list[str]) -> None:
    """In a fresh subprocess: predict one PNG as ``segflow predict`` does; print peak memory and seconds as JSON.

    argv: model folder, PNG, output folder, "whole" or "stream", "model" or "conv".
    """
    import torch

    from segflow.params import load_params
    from segflow.semantic import predict, store
    from segflow.semantic.infer import Predictor, torch_forward

    folder, png, out, how, forward_kind = argv
    model, card = store.load(Path(folder))
    if forward_kind == "conv":  # the same shapes in and out, a fraction of the arithmetic
        torch.manual_seed(0)
        model = torch.nn.Conv2d(card.in_channels, len(card.classes), 3, padding=1)
    cfg = load_params(ROOT / "params.yaml").predict
    predictor = Predictor(torch_forward(model, "cpu"), card, cfg.tile_size, cfg.overlap, cfg.batch_size)
    predictor.forward(np.zeros((cfg.batch_size, card.in_channels, cfg.tile_size, cfg.tile_size), np.float32))
    loaded = _vm_hwm()
    start = time.perf_counter()
    _, errors = predict.run(predictor, [Path(png)], Path(out), progress=False, stream=how == "stream")
    seconds = time.perf_counter() - start
    print(json.dumps({"peak": _vm_hwm(), "loaded": loaded, "seconds": seconds, "errors": errors}))


def _measure(folder: Path, png: Path, out: Path, how: str, forward_kind: str) -> dict:
    command = "import sys; from bench.predict import _peak; _peak(sys.argv[1:])"
    done = subprocess.run(
        [sys.executable, "-c", command, str(folder), str(png), str(out), how, forward_kind],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"predicting {png.name} {how} failed: {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"predicting {png.name} {how}: {result['errors'][0]}")
    return result


def _agreement(first: Path, second: Path) -> float:
    """The fraction of pixels two 8-bit masks agree on, read a strip at a time (they may be large)."""
    from segflow import pngstream

    same = total = 0
    pairs = zip(pngstream.strips(pngstream.scan(first)), pngstream.strips(pngstream.scan(second)), strict=True)
    for a, b in pairs:
        same, total = same + np.count_nonzero(a == b), total + a.size
    return same / total


def memory(work: Path, sizes: tuple[int, ...] = (2048, 6000, 12000), model_up_to: int = MODEL_UP_TO) -> str:
    """Peak memory and seconds of predicting large RGB PNGs whole and streamed; the markdown table."""
    from segflow.semantic.infer import Predictor
    from segflow.semantic.predict import available_memory

    work.mkdir(parents=True, exist_ok=True)
    _, card, cfg = _model(work, onnx=False)
    folder = work / "model"
    plan = Predictor(lambda batch: batch, card, cfg.tile_size, cfg.overlap, cfg.batch_size)
    gib = lambda size: f"{size / 2**30:.2f} GiB"  # noqa: E731
    rows, notes, per_tile = [], [], None
    for side in sizes:
        png = work / f"{side}.png"
        _synthetic_png(png, side)
        tiles = len(list(plan._windows(-(-side // card.pad_divisor) * card.pad_divisor, side)))
        for forward_kind in ("model", "conv") if side <= model_up_to else ("conv",):
            results = {}
            need = plan.whole_bytes(side, side) + 3 * side * side
            room, source = available_memory()
            for how in ("whole", "stream"):
                if how == "whole" and need > 0.6 * room:
                    notes.append(
                        f"{side} px whole not run: it needs about {gib(need)} beyond the model, above 60% of "
                        f"{source} ({gib(room)})."
                    )
                    continue
                results[how] = _measure(folder, png, work / f"{side}-{how}-{forward_kind}", how, forward_kind)
            same = "-"
            if len(results) == 2:
                agree = _agreement(*(work / f"{side}-{how}-{forward_kind}" / png.name for how in results))
                same = "yes" if agree == 1 else f"{agree:.6%}"
            cells = []
            for how in ("whole", "stream"):
                if how in results:
                    r = results[how]
                    cells += [gib(r["peak"]), gib(r["peak"] - r["loaded"]), f"{r['seconds']:.1f}"]
                else:
                    cells += ["not run", "-", "-"]
            name = f"{card.arch}/{card.encoder}" if forward_kind == "model" else "1-layer conv"
            if forward_kind == "model":
                per_tile = results["stream"]["seconds"] / tiles
            rows.append(f"| {side}x{side} | {tiles} | {name} | " + " | ".join(cells) + f" | {same} |")
        for path in work.glob(f"{side}*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    table = [
        "| image | tiles | forward | whole: peak RSS | whole: above model | whole: s "
        "| streamed: peak RSS | streamed: above model | streamed: s | same class ids |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
        *rows,
    ]
    return "\n".join(
        [
            *table,
            "",
            f"Synthetic RGB PNGs predicted by `segflow.semantic.predict.run` in a fresh subprocess each (peak: the "
            f"child's VmHWM; above model: less its VmHWM after loading the model and one batch of "
            f"{cfg.batch_size} tiles). Tiles {cfg.tile_size} px, overlap {cfg.overlap}. Sides above "
            f"{model_up_to} px run a seeded one-layer 3x3 convolution with the demo model's input and output "
            "shapes instead of the model"
            + (f" (the model takes about {per_tile:.2f} s a tile here)" if per_tile else "")
            + "; memory is the point. "
            "Streamed memory grows with the width (the rows tiles still cover), not with the area.",
            *(["", *notes] if notes else []),
        ]
    )
