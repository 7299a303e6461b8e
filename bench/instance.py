"""Instance segmentation (Mask R-CNN) on the CPU: the instance demo (this benchmark), and ISBI 2012 cells
against a semantic model (``bench/isbi_cells.py``, which uses the functions here).

1. The instance demo (``configs/instance-demo.yaml`` over this repository's params): ``segflow run`` from
   nothing in a scratch project; its time per stage and test mask AP, AP50, box AP, count error.
2. Where ``../shared/datasets/isbi2012-membrane`` exists: ``configs/isbi2012-cells.yaml`` (Mask R-CNN on
   the cells, 20 minutes of training) and, side by side on the same six held-out slices, the semantic
   ``configs/isbi2012.yaml`` model's cells taken as the connected regions (4-connectivity) of its cell
   mask (the way nnU-Net users get instances), both scored by the same COCO evaluator: AP50, AP and the
   count error per slice.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from bench._util import BIN, ROOT, env, fresh_project, timed
from segflow.config import apply

TITLE = "Instance segmentation (Mask R-CNN) on the CPU"
ISBI = ROOT.parent / "shared" / "datasets" / "isbi2012-membrane"


def _project(work: Path, name: str, *configs: str, extra: dict | None = None) -> Path:
    from segflow.config import set_params

    project = fresh_project(work / name)
    for config in configs:
        apply(project, ROOT / config)
    if extra:
        set_params(project, extra, "the benchmark")
    return project


def _demo(work: Path) -> list[str]:
    project = _project(work, "instance-demo", "configs/instance-demo.yaml")
    seconds, _ = timed([str(BIN / "segflow"), "run"], project, env(PREFECT_HOME=str(work / "prefect-home")))
    metrics = json.loads((project / "data/evaluate/metrics.json").read_text())
    card = json.loads((project / "data/train/model/model.json").read_text())
    live = json.loads((project / "data/train/live/metrics.json").read_text())
    return [
        "### The instance demo (`segflow params configs/instance-demo.yaml && segflow run`)",
        "",
        "| what | value |",
        "|---|---:|",
        f"| `segflow run` from nothing (all five stages) | {seconds:.0f} s |",
        f"| training (fit, {card['training']['epochs']} epochs, {card['training']['train_images']} images) | "
        f"{live['perf']['fit_s']:.0f} s |",
        f"| parameters (ResNet-18 FPN, width {card['width']}) | {card['training']['parameters'] / 1e6:.1f} M |",
        f"| test mask AP / AP50 / AP75 ({metrics['images']} images) | {metrics['segm']['map']:.3f} / "
        f"{metrics['segm']['map_50']:.3f} / {metrics['segm']['map_75']:.3f} |",
        f"| test box AP | {metrics['bbox']['map']:.3f} |",
        f"| pixel IoU macro (from the instance masks) | {metrics['iou']['macro']:.3f} |",
        f"| mean absolute count error per image | {metrics['count']['mae']:.2f} |",
        "",
    ]


def _semantic_cells(project: Path) -> dict:
    """The semantic model's cells (connected regions of its cell class) on the test slices, COCO-scored."""
    import os

    from segflow.data.instances import cells_from_label
    from segflow.instance import metrics as scoring
    from segflow.io import read_image
    from segflow.layout import read_manifest, split_rows
    from segflow.params import load_params
    from segflow.registry.fetch import load_model

    here = Path.cwd()
    os.chdir(project)
    try:
        params = load_params(project / "params.yaml")
        predictor = load_model(str(project / "data/train/model"), project)
        cell = params.classes.index("cell")
        rows = split_rows(read_manifest(project / "data/ingest"), "test")
        truths, preds = [], []
        for row in rows.itertuples():
            image = read_image(project / "data/ingest" / row.image)
            found = cells_from_label(predictor.predict(image), cell)
            ids = [i for i in np.unique(found) if i]
            masks = np.stack([found == i for i in ids]) if ids else np.zeros((0, *found.shape), bool)
            # One score for all: connected components have no confidence (AP then ranks them in one tie).
            preds.append(scoring.ImagePrediction(row.id, masks, np.zeros(len(ids), int), np.ones(len(ids))))
            truths.append(_isbi_truth(row.id))
        return scoring.evaluate(truths, preds, ["cell"], max_dets=300)
    finally:
        os.chdir(here)


def _isbi_truth(slice_id: str):
    from PIL import Image

    from segflow.data.instances import cells_from_label
    from segflow.instance import metrics as scoring

    label = np.asarray(Image.open(ISBI / "masks" / f"{slice_id}.png"))
    ids = cells_from_label(label, 255)
    areas = np.bincount(ids.ravel())
    keep = np.where(areas >= 16)[0]
    keep = keep[keep > 0]
    table = np.zeros(len(areas), dtype=np.uint16)
    table[keep] = np.arange(1, len(keep) + 1)
    return scoring.ImageTruth(slice_id, table[ids], {i: 0 for i in range(1, len(keep) + 1)})


def _isbi(work: Path) -> list[str]:
    path = {"ingest": {"path": str(ISBI)}}
    cells = _project(work, "isbi-cells", "configs/isbi2012-cells.yaml", extra=path)
    began = time.perf_counter()
    timed([str(BIN / "python"), "-m", "dvc", "repro"], cells)
    cells_s = time.perf_counter() - began
    semantic = _project(work, "isbi-semantic", "configs/isbi2012.yaml", extra=path)
    began = time.perf_counter()
    timed([str(BIN / "python"), "-m", "dvc", "repro"], semantic)
    semantic_s = time.perf_counter() - began
    return isbi_table(cells, semantic, f"{cells_s / 60:.1f} min", f"{semantic_s / 60:.1f} min")


def isbi_table(cells: Path, semantic: Path, cells_took: str, semantic_took: str) -> list[str]:
    """The comparison of the two finished projects (``*_took``: what the last column says of each)."""
    scores = json.loads((cells / "data/evaluate/scores.json").read_text())
    components = _semantic_cells(semantic)
    fit = json.loads((cells / "data/train/live/metrics.json").read_text())["perf"]["fit_s"]
    epochs = json.loads((cells / "data/train/model/model.json").read_text())["training"]["epochs"]
    rows = [
        (
            "Mask R-CNN (configs/isbi2012-cells.yaml)",
            scores,
            f"{cells_took} ({epochs} epochs, {fit / 60:.1f} min training)",
        ),
        ("semantic U-Net (configs/isbi2012.yaml) + connected components", components, semantic_took),
    ]
    lines = [
        "### ISBI 2012 cells, the 6 held-out slices",
        "",
        "Truth: the connected regions (4-connectivity) of the cell label, 16 px or more. Both scored with the "
        "same COCO evaluator (maxDets 300).",
        "",
        "| model | mask AP50 | mask AP | true / predicted cells | count error per slice | `dvc repro` |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, result, took in rows:
        counts = result["counts"]
        lines.append(
            f"| {name} | {result['segm']['map_50']:.3f} | {result['segm']['map']:.3f} | {counts['true_total']} / "
            f"{counts['pred_total']} | {counts['mean_abs_count_error']:.1f} | {took} |"
        )
    better = max(rows, key=lambda r: r[1]["segm"]["map_50"])[0]
    lines += ["", f"Higher AP50 here: {better}.", ""]
    return lines


def run(work: Path) -> str:
    return "\n".join([*_demo(work), "ISBI 2012 cells: `python bench/run.py isbi_cells` (its own section).", ""])
