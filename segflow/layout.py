"""The files stages hand to each other: their names and their readers.

Kept apart from the stage modules so that a stage depends (in dvc.yaml and in
Python) on this small module rather than on another stage's code.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

from segflow import recipes
from segflow.errors import SegflowError

# ${paths.ingest}/
MANIFEST = "manifest.csv"
IMAGES = "images"
MASKS = "masks"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
#: task: instance: one row per object (masks/<id>.png holds its instance id); box bounds are pixel
#: indices, x1 and y1 exclusive.
INSTANCES = "instances.csv"
INSTANCE_COLUMNS = ("id", "instance", "class", "crowd", "area", "x0", "y0", "x1", "y1")
# ${paths.augment}/
TRAIN_PIPELINE = "train.json"
EVAL_PIPELINE = "eval.json"
AUGMENT_PREVIEW = "preview.png"
# ${paths.train}/
MODEL_DIR = "model"
LIVE_DIR = "live"
# ${paths.evaluate}/
METRICS = "metrics.json"  # headline scores only, numbers: what `dvc metrics show` / `diff` list
SCORES = "scores.json"  # everything metrics.json is drawn from: per class, the split, the reduction
SPEED = "speed.json"
PER_CLASS = "per_class.csv"
PER_IMAGE = "per_image.csv"
PREDICTIONS = "predictions.png"
CONFUSION = "confusion.png"


def read_manifest(ingest_dir: Path) -> pd.DataFrame:
    """Read the manifest ingest wrote.

    Raises:
        SegflowError: it is missing (ingest has not run).
    """
    import pandas as pd  # here, not at the top: the orchestration reads only the names above (0.5 s saved)

    path = Path(ingest_dir) / MANIFEST
    if not path.is_file():
        raise SegflowError(f"{path}: not found; run the ingest stage first (dvc repro ingest)")
    manifest = pd.read_csv(path, dtype={"id": str, "split": str, "group": str}, keep_default_na=False)
    manifest.attrs["path"] = str(path)  # for error messages about its contents
    return manifest


def read_instance_table(ingest_dir: Path) -> pd.DataFrame:
    """The objects ingest found (task: instance), one row each, by (id, instance).

    Raises:
        SegflowError: it is missing (ingest has not run with task: instance).
    """
    import pandas as pd

    path = Path(ingest_dir) / INSTANCES
    if not path.is_file():
        raise SegflowError(f"{path}: not found; run the ingest stage with task: instance (dvc repro ingest)")
    return pd.read_csv(path, dtype={"id": str, "class": str}, keep_default_na=False)


def image_channels(manifest: pd.DataFrame) -> int:
    """The channel count of the dataset's images (ingest makes them agree).

    Raises:
        SegflowError: the manifest mixes channel counts (written by something other than ingest).
    """
    counts = sorted(set(manifest["channels"].tolist())) if "channels" in manifest else [3]
    if len(counts) != 1:
        raise SegflowError(
            f"{manifest.attrs.get('path', MANIFEST)}: images have {counts} channels; rerun dvc repro ingest"
        )
    return int(counts[0])


def split_rows(manifest: pd.DataFrame, split: str, *, required: bool = True) -> pd.DataFrame:
    """The manifest rows of one split, in id order.

    Raises:
        SegflowError: ``required`` and the split has no rows.
    """
    rows = manifest[manifest["split"] == split].sort_values("id").reset_index(drop=True)
    if required and rows.empty:
        fix = (
            f"rerun ingest with a larger ingest.{split}_fraction"
            if split != "train"
            else "lower ingest.val_fraction / ingest.test_fraction"
        )
        raise SegflowError(f"{manifest.attrs.get('path', MANIFEST)}: no '{split}' images; {fix}")
    return rows


def load_transform(path: Path, seed: int | None = None):
    """Load a pipeline the augment stage saved; ``A.save`` drops the seed, so set it again.

    Returns:
        albumentations.Compose.

    Raises:
        SegflowError: the file is missing or is not an albumentations pipeline.
    """
    # Imported here: albumentations imports torch (seconds), which ingest never needs.
    import albumentations as A

    path = Path(path)
    if not path.is_file():
        raise SegflowError(f"{path}: not found; run the augment stage first (dvc repro augment)")
    try:
        with warnings.catch_warnings():
            # albumentations 2.0 writes PadIfNeeded's derived `padding` into the file and then warns about it on load.
            warnings.filterwarnings("ignore", message=r"Argument\(s\) 'padding' are not valid", category=UserWarning)
            transform = A.load(str(path))
    except (ValueError, KeyError, TypeError) as error:
        raise SegflowError(f"{path}: not an albumentations pipeline ({error}); rerun dvc repro augment") from None
    if seed is not None:
        recipes.reseed(transform, seed)
    return transform


def read_scores(evaluate_dir: Path) -> dict | None:
    """The evaluate stage's full scores (``scores.json``; a project evaluated before it existed: its
    ``metrics.json``, which held them), or None before evaluate ran."""
    import json

    for name in (SCORES, METRICS):
        path = Path(evaluate_dir) / name
        if path.is_file():
            return json.loads(path.read_text())
    return None


def headline_metrics(scores: dict) -> dict:
    """metrics.json from the full scores: numbers only, a few columns (per class is in per_class.csv)."""
    keep = ("macro", "macro_foreground", "micro")
    return {
        "images": scores["images"],
        "iou": {k: scores["iou"][k] for k in keep},
        "dice": {k: scores["dice"][k] for k in keep},
        "pixel_accuracy": scores["pixel_accuracy"],
    }


def split_digest(ingest_dir: Path, rows: pd.DataFrame) -> str:
    """The identity of a split: sha256 over its ids and their stored image and mask bytes (the same rows
    with the same pixels give the same digest, on any machine)."""
    import hashlib

    from segflow.io import sha256_file

    digest = hashlib.sha256()
    for row in rows.itertuples():
        line = f"{row.id}\t{sha256_file(Path(ingest_dir) / row.image)}\t{sha256_file(Path(ingest_dir) / row.mask)}\n"
        digest.update(line.encode())
    return digest.hexdigest()


def spread(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (first and last included), for pictures that
    show a whole split rather than its first, often near-identical, consecutive files."""
    if count <= 0 or total <= 0:
        return []
    if count >= total:
        return list(range(total))
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})
