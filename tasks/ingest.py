"""Stage ``ingest``: bring the dataset into the project's layout.

Writes ``${paths.ingest}/``:
- ``images/<id>.png``: RGB images,
- ``masks/<id>.png``: one-channel class-index masks (0 = ``classes[0]``),
- ``manifest.csv``: one row per sample (id, split, size, file names, per-class
  pixel counts), the table every later stage reads.

The split is a function of each sample's id and the seed alone (a hash), so
adding images never moves an existing image to another split.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pandas as pd

from tasks import _synthetic
from tasks._common import SegflowError, atomic_dir, stage_main, write_png
from tasks._files import IMAGES, MANIFEST, MASKS
from tasks.params import IngestParams, Params, Paths

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def split_of(sample_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split of one sample: a seeded hash of its id, cut at the fractions."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def assign_splits(ids: list[str], seed: int, val_fraction: float, test_fraction: float) -> list[str]:
    """Split every id; fail when a split that was asked for comes out empty.

    Raises:
        SegflowError: a requested split (fraction > 0) got no samples.
    """
    splits = [split_of(i, seed, val_fraction, test_fraction) for i in ids]
    wanted = {"train": 1.0, "val": val_fraction, "test": test_fraction}
    for name, fraction in wanted.items():
        if fraction > 0 and name not in splits:
            raise SegflowError(
                f"split '{name}' got none of the {len(ids)} images "
                f"(ingest.val_fraction={val_fraction}, ingest.test_fraction={test_fraction}); "
                "add images or raise that fraction"
            )
    return splits


def manifest_row(sample_id: str, mask: np.ndarray, classes: list[str]) -> dict:
    """The manifest fields of one sample; pixel counts per class name.

    Args:
        mask: (H, W) uint8 class ids.
    """
    counts = np.bincount(mask.ravel(), minlength=len(classes))
    if counts.size > len(classes):
        bad = int(np.flatnonzero(counts[len(classes) :])[0]) + len(classes)
        raise SegflowError(
            f"{sample_id}: mask holds class id {bad} but classes lists only {len(classes)}; "
            "extend classes in params.yaml or fix the mask"
        )
    row = {
        "id": sample_id,
        "height": mask.shape[0],
        "width": mask.shape[1],
        "image": f"{IMAGES}/{sample_id}.png",
        "mask": f"{MASKS}/{sample_id}.png",
    }
    row.update({f"px_{name}": int(count) for name, count in zip(classes, counts, strict=True)})
    return row


def _samples(params: IngestParams, classes: list[str], seed: int):
    """The source's ``(id, image, mask)`` stream; only ``synthetic`` exists so far."""
    synth = params.synthetic
    # tasks/params.py has already checked the class count and weights against the generator.
    yield from _synthetic.generate(
        seed=seed,
        num_images=synth.num_images,
        num_classes=len(classes),
        size=synth.image_size,
        min_objects=synth.min_objects,
        max_objects=synth.max_objects,
        noise=synth.noise,
        class_weights=synth.class_weights,
    )


def run(params: Params, paths: Paths) -> pd.DataFrame:
    """Write images, masks and the manifest under ``paths.ingest`` (atomically).

    Returns:
        The manifest.
    """
    cfg = params.ingest
    rows = []
    with atomic_dir(paths.ingest) as out:
        (out / IMAGES).mkdir()
        (out / MASKS).mkdir()
        for sample_id, image, mask in _samples(cfg, params.classes, params.seed):
            write_png(out / IMAGES / f"{sample_id}.png", image)
            write_png(out / MASKS / f"{sample_id}.png", mask)
            rows.append(manifest_row(sample_id, mask, params.classes))
        manifest = pd.DataFrame(rows)
        ids = manifest["id"].tolist()
        manifest.insert(1, "split", assign_splits(ids, params.seed, cfg.val_fraction, cfg.test_fraction))
        manifest.to_csv(out / MANIFEST, index=False)

    counts = manifest["split"].value_counts()
    pixels = manifest[[f"px_{c}" for c in params.classes]].sum()
    share = ", ".join(f"{c} {100 * n / pixels.sum():.1f}%" for c, n in zip(params.classes, pixels, strict=True))
    log.info(
        "%d images (%s) into %s; pixels: %s",
        len(manifest),
        ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS),
        paths.ingest,
        share,
    )
    return manifest


def main() -> None:
    stage_main(run, "ingest")


if __name__ == "__main__":
    main()
