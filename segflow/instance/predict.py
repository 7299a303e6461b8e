"""``segflow predict`` with an instance model: per image an instance-id PNG, COCO results JSON and an overlay.

- ``<stem>.png``: 16-bit instance ids (0 = background, 1 = the best-scoring object, ...) of the objects
  scoring at least ``count_threshold`` (``evaluate.count_threshold``: what evaluate counts); where two
  overlap, the higher score wins;
- ``<stem>.json``: every kept detection (score >= ``predict.score_threshold``) as COCO results:
  ``image_id`` the file stem, ``category_id`` the card's id of its category, RLE ``segmentation``,
  ``bbox``, ``score``; score them against COCO ground truth with any COCO evaluator;
- ``<stem>_overlay.png`` (``--overlay``): the image with each counted object outlined in its own colour.

Images larger than ``predict.tile_size`` are predicted in tiles (:mod:`segflow.instance.infer`).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from segflow import viz
from segflow.errors import SegflowError
from segflow.instance.infer import Predictor
from segflow.instance.metrics import coco_results
from segflow.io import atomic_path, write_instances
from segflow.progress import logged
from segflow.semantic.predict import check_targets, read

log = logging.getLogger(__name__)


def outline(image: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The image with each object's outline drawn in its own colour: (H, W, 3) uint8."""
    rgb = viz.as_rgb(image).copy()
    edges = viz.object_edges(ids)
    rgb[edges] = viz.instance_colours(ids, outlined=False)[edges]
    return rgb


def run(
    predictor: Predictor,
    files: list[Path],
    out: Path,
    with_overlay: bool = False,
    progress: bool = True,
    count_threshold: float = 0.5,
) -> tuple[int, list[str]]:
    """Predict every file into ``out``; returns (images written, one error line per file that failed)."""
    from tqdm import tqdm

    check_targets(files, out, with_overlay)
    out.mkdir(parents=True, exist_ok=True)
    written, errors = 0, []
    # A bar in a terminal; otherwise (a log file, a worker) a line every 30 s.
    for path in tqdm(files, unit="image", file=sys.stderr) if progress else logged(files, len(files), "predict", log):
        try:
            image = read(path)
        except SegflowError as error:
            errors.append(str(error))
            print(f"segflow: error: {error}; skipped", file=sys.stderr)
            continue
        found = predictor.predict(image)
        ids = found.id_image(count_threshold)
        with atomic_path(out / f"{path.stem}.png") as tmp:
            write_instances(tmp, ids)
        results = coco_results(found.as_prediction(path.stem), predictor.card.category_ids)
        with atomic_path(out / f"{path.stem}.json") as tmp:
            tmp.write_text(json.dumps(results) + "\n", encoding="utf-8")
        if with_overlay:
            with atomic_path(out / f"{path.stem}_overlay.png") as tmp:
                Image.fromarray(outline(image, ids)).save(tmp, format="PNG")
        written += 1
    return written, errors
