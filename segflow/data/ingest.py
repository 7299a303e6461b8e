"""Stage ``ingest``: bring a dataset into the project's layout, checked and normalised.

Sources (``ingest.source``): ``synthetic``, the built-in demo scenes, and
``folder``, the user's images and masks in a folder or an archive at
``ingest.path`` (see :mod:`segflow.data.folder` for the layouts). Each source yields
work items; this stage decodes them in parallel worker processes (a bounded
number in flight), validates them (:mod:`segflow.data.checks` holds every rule),
normalises them and writes ``${paths.ingest}/``, all at once or not at all:

- ``images/<id>.png``: 8-bit images, one channel (grayscale) or three (RGB);
- ``masks/<id>.png``: one-channel class ids (0 = ``classes[0]``, 255 = ignore);
- ``manifest.csv``: one row per sample: id, split, group, size, channels,
  file names, source files and their sha256, pixels per class;
- ``report.json`` / ``report.md``: counts and class shares per split, image
  sizes, and every problem found with what was done about it.

With ``layout: paired`` the split is a seeded hash of each sample's id (or of
its ``ingest.group``), so adding images never moves an existing one; with
``split_folders`` the dataset's own split is kept. The user's files are only read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import shutil
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from segflow.data import archive, folder, instances, report, splits, synthetic
from segflow.data.checks import Problem, Problems
from segflow.data.decode import MaskEncoding
from segflow.errors import SegflowError
from segflow.io import atomic_dir, write_instances, write_png
from segflow.layout import IMAGES, INSTANCE_COLUMNS, INSTANCES, MANIFEST, MASKS, REPORT_JSON, REPORT_MD
from segflow.params import IGNORE_INDEX, INSTANCE_LAYOUTS, IngestParams, Params, Paths

log = logging.getLogger(__name__)
#: Layouts whose split is the seeded hash of each id (the others bring their own).
_HASHED = ("paired", *INSTANCE_LAYOUTS)

# fork starts a worker in milliseconds with everything already imported; the stage runs no threads
# that a fork could copy mid-lock. Elsewhere (macOS, Windows) spawn is the safe default.
_START_METHOD = "fork" if sys.platform == "linux" else "spawn"


def class_counts(mask: np.ndarray, classes: list[str]) -> dict:
    """Pixels per class name, and ignored pixels, of one (H, W) uint8 class-id mask."""
    counts = np.bincount(mask.ravel(), minlength=256)
    row = {f"px_{name}": int(count) for name, count in zip(classes, counts, strict=False)}
    row["px_ignored"] = int(counts[IGNORE_INDEX])
    return row


@dataclass(frozen=True)
class _Job:
    """What every worker needs besides its item."""

    out: Path
    classes: tuple[str, ...]
    encoding: MaskEncoding
    channels: str | int
    max_pixels: int
    scale_16bit: str
    task: str = "semantic"


def _channels(image: np.ndarray, stored: dict, channels: str | int) -> np.ndarray:
    """The image with the channel count ``ingest.channels`` asks for (``stored["image"]`` dropped if changed)."""
    if channels == 3 and image.shape[2] == 1:
        image, stored["image"] = np.repeat(image, 3, axis=2), None
    elif channels == 1 and image.shape[2] == 3:
        image, stored["image"] = np.asarray(Image.fromarray(image).convert("L"))[..., None], None  # ITU-R 601 luma
    return image


def _row(item, image: np.ndarray, provenance: dict) -> dict:
    """The manifest columns every sample has."""
    return {
        "id": item.id,
        "split": item.split,
        "height": image.shape[0],
        "width": image.shape[1],
        "channels": image.shape[2],
        "image": f"{IMAGES}/{item.id}.png",
        "mask": f"{MASKS}/{item.id}.png",
        **provenance,
        "sha256_pixels": hashlib.sha256(f"{image.shape}".encode() + image.tobytes()).hexdigest(),
    }


def _ingest_objects(item, job: _Job) -> dict | Problem:
    """task: instance: read, check and write one image and its objects (runs in a worker process).

    Returns:
        Its manifest row (objects per category, and the objects themselves under ``_objects`` for
        ``instances.csv``), or the problem that rules it out.
    """
    try:
        image, instances, table, provenance = item.read(job.max_pixels, job.scale_16bit)
    except Problem as problem:
        return problem
    image = _channels(image, {}, job.channels)
    write_png(job.out / IMAGES / f"{item.id}.png", image)
    write_instances(job.out / MASKS / f"{item.id}.png", instances)
    objects = instance_table(instances, table)
    row = _row(item, image, provenance)
    for index, name in enumerate(job.classes):
        row[f"n_{name}"] = sum(1 for o in objects if o["class"] == index and not o["crowd"])
    row["n_crowd"] = sum(1 for o in objects if o["crowd"])
    row["_objects"] = [{"id": item.id, **o, "class": job.classes[o["class"]]} for o in objects]
    return row


def instance_table(instances: np.ndarray, table: list[dict]) -> list[dict]:
    """Each object's row with its pixel area and box (x0, y0, x1, y1: inclusive-exclusive pixel bounds).

    Args:
        instances: (H, W) uint16 instance ids.
        table: ``[{"instance", "class", "crowd"}]`` as the source read them.
    """
    found = []
    for entry in table:
        ys, xs = np.nonzero(instances == entry["instance"])
        found.append(
            {
                "instance": int(entry["instance"]),
                "class": int(entry["class"]),
                "crowd": bool(entry["crowd"]),
                "area": len(ys),
                "x0": int(xs.min()) if len(xs) else 0,
                "y0": int(ys.min()) if len(ys) else 0,
                "x1": int(xs.max()) + 1 if len(xs) else 0,
                "y1": int(ys.max()) + 1 if len(ys) else 0,
            }
        )
    return found


def _ingest_one(item, job: _Job) -> dict | Problem:
    """Read, check, normalise and write one sample (runs in a worker process).

    Returns:
        Its manifest row, or the problem that rules it out.
    """
    if job.task == "instance":
        return _ingest_objects(item, job)
    try:
        image, raw_mask, provenance, stored = item.read(
            job.max_pixels, job.scale_16bit, job.encoding.palette is not None
        )
        if image.shape[:2] != raw_mask.shape[:2]:
            (ih, iw), (mh, mw) = image.shape[:2], raw_mask.shape[:2]
            raise Problem(
                "size_mismatch", item.mask_name, mask_size=f"{mw}x{mh}", image=item.image_name, image_size=f"{iw}x{ih}"
            )
        mask = job.encoding.encode(raw_mask, item.mask_name)
    except Problem as problem:
        return problem
    image = _channels(image, stored, job.channels)
    if stored.get("mask") is not None and not np.array_equal(mask, raw_mask):
        stored["mask"] = None
    # A source file that already is the PNG ingest would write is copied: encoding is most of the cost.
    for subdir, array, key in ((IMAGES, image, "image"), (MASKS, mask, "mask")):
        target = job.out / subdir / f"{item.id}.png"
        if stored.get(key) is not None:
            target.write_bytes(stored[key])
        else:
            write_png(target, array)
    return _row(item, image, provenance) | class_counts(mask, list(job.classes))


def _run_all(items: list, job: _Job, workers: int) -> Iterator[dict | Problem]:
    """Results in item order; at most ``2 * workers`` samples are being decoded at once."""
    if workers <= 1 or len(items) < 2:
        yield from (_ingest_one(item, job) for item in items)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(_START_METHOD))
    try:
        pending = deque()
        for item in items:
            pending.append(pool.submit(_ingest_one, item, job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _encoding(cfg: IngestParams, classes: list[str]) -> MaskEncoding:
    palette = None
    if cfg.palette is not None:
        palette = {tuple(colour): classes.index(name) for name, colour in cfg.palette.items()}
    ignore = frozenset(tuple(v) if isinstance(v, tuple | list) else v for v in cfg.ignore_values)
    return MaskEncoding(len(classes), cfg.mask_values, palette, ignore)


def _items(params: Params, scratch: Path, problems: Problems) -> list:
    """The source's work items (and, for archives, their unpacked files under ``scratch``)."""
    cfg = params.ingest
    if cfg.source == "synthetic":
        synth = cfg.synthetic
        # segflow/params.py has already checked the class count and weights against the generator.
        # classes: with task instance the object categories, else background included (each generator knows).
        make = synthetic.instance_items if params.task == "instance" else synthetic.items
        return make(
            params.seed,
            synth.num_images,
            len(params.classes),
            synth.image_size,
            synth.min_objects,
            synth.max_objects,
            synth.noise,
            synth.class_weights,
        )
    path = cfg.path
    if not path.exists():
        raise SegflowError(
            f"ingest.path: {path} does not exist; put the dataset there (dvc add / dvc import-url) or fix the path"
        )
    if archive.is_archive(path):
        scratch.mkdir()
        for problem in archive.extract(path, scratch, str(path)):
            problems.add(problem)
        return _discover(scratch, params, f"{path}:", problems)
    if not path.is_dir():
        raise SegflowError(
            f"ingest.path: {path} is neither a folder nor an archive ({', '.join(archive.ARCHIVE_SUFFIXES)})"
        )
    return _discover(path, params, f"{str(path).rstrip('/')}/", problems)


def _discover(root: Path, params: Params, label: str, problems: Problems) -> list:
    """The folder's work items in the layout params name (image/mask pairs, or images with their objects)."""
    cfg = params.ingest
    if params.task != "instance":
        return folder.discover(root, cfg, label, problems)
    return instances.discover(
        root,
        cfg.layout,
        classes=list(params.classes),
        label=label,
        problems=problems,
        images_dir=cfg.images_dir,
        masks_dir=cfg.masks_dir,
        annotations=cfg.annotations,
        class_table=cfg.instance_classes,
        cityscapes=cfg.cityscapes,
        component_value=cfg.component_value,
        negatives=cfg.negatives,
        min_area=cfg.min_area,
        image_suffix=cfg.image_suffix,
        mask_suffix=cfg.mask_suffix,
    )


def _drop(out: Path, row: dict) -> None:
    (out / row["image"]).unlink()
    (out / row["mask"]).unlink()


def _collect(items: list, job: _Job, params: Params, problems: Problems) -> list[dict]:
    """Decode every item; split, deduplicate and make channels agree; rows in id order."""
    cfg = params.ingest
    groups = {}
    usable = []
    for item in items:
        try:
            groups[item.id] = splits.group_of(item.id, cfg.group, item.image_name)
            usable.append(item)
        except Problem as problem:
            problems.add(problem)
    rows = []
    for result in _run_all(usable, job, cfg.resolved_workers()):
        if isinstance(result, Problem):
            problems.add(result)
        else:
            result["group"] = groups[result["id"]]
            rows.append(result)
    if not rows:
        raise SegflowError(
            Problem("empty_dataset", cfg.path, expected=_expected(cfg)).line()
            if cfg.source == "folder"
            else "ingest: no samples"
        )
    if cfg.source == "synthetic" or (cfg.layout in _HASHED and cfg.split_lists is None):
        keys = [r["group"] for r in rows]
        fixed = splits.fixed_groups(rows, cfg.split_ids or {})
        if cfg.test_ids:
            frozen = splits.fixed_groups(rows, {"test": cfg.test_ids}, key="ingest.test_ids")
            both = sorted(g for g in frozen if fixed.get(g, "test") != "test")
            if both:
                raise SegflowError(f"ingest.test_ids and ingest.split_ids both place group '{both[0]}'; keep one")
            fixed |= frozen
        assigned = splits.assign_splits(keys, params.seed, cfg.val_fraction, cfg.test_fraction, fixed)
        if cfg.test_ids:  # a frozen test set: what the hash sends to test beyond it trains
            assigned = splits.freeze_test(keys, assigned, fixed)
        for row, split in zip(rows, assigned, strict=True):
            row["split"] = split
    rows = _deduplicate(rows, job.out, problems)
    if job.channels == "auto" and len({r["channels"] for r in rows}) > 1:
        # Mixed grayscale and colour: everything becomes RGB.
        for row in (r for r in rows if r["channels"] == 1):
            path = job.out / row["image"]
            with Image.open(path) as img:
                write_png(path, np.asarray(img.convert("RGB")))
            row["channels"] = 3
    return rows


def _expected(cfg: IngestParams) -> str:
    if cfg.layout == "paired":
        return f"{cfg.images_dir}/ and {cfg.masks_dir}/"
    return ", ".join(f"{d}/ + {d}{cfg.annot_suffix}/" for d in cfg.split_dirs.model_dump().values() if d)


def _deduplicate(rows: list[dict], out: Path, problems: Problems) -> list[dict]:
    """Keep the first (by id) of each set of pixel-identical images; the others are problems."""
    first: dict[str, dict] = {}
    dropped = set()
    for row in rows:
        kept = first.setdefault(row["sha256_pixels"], row)
        if kept is row:
            continue
        straddle = f" (split {row['split']}, the other is in {kept['split']})" if row["split"] != kept["split"] else ""
        problems.add(Problem("duplicate", row["source_image"], other=kept["source_image"], straddle=straddle))
        _drop(out, row)
        dropped.add(row["id"])
    return [r for r in rows if r["id"] not in dropped]


def run(params: Params, paths: Paths) -> pd.DataFrame:
    """Write images, masks, the manifest and the data report under ``paths.ingest`` (atomically).

    Returns:
        The manifest.

    Raises:
        SegflowError: the source is missing or empty, a split is empty, or (``on_bad: stop``) a bad file.
    """
    cfg = params.ingest
    problems = Problems(cfg.on_bad)
    with atomic_dir(paths.ingest) as out:
        (out / IMAGES).mkdir()
        (out / MASKS).mkdir()
        scratch = out / ".source"
        job = _Job(
            out,
            tuple(params.classes),
            _encoding(cfg, params.classes) if params.task == "semantic" else None,
            cfg.channels,
            cfg.max_pixels,
            cfg.scale_16bit,
            params.task,
        )
        items = _items(params, scratch, problems)
        rows = _collect(items, job, params, problems)
        shutil.rmtree(scratch, ignore_errors=True)
        columns = [
            "id",
            "split",
            "group",
            "height",
            "width",
            "channels",
            "image",
            "mask",
            "source_image",
            "source_mask",
            "sha256_image",
            "sha256_mask",
            "sha256_pixels",
        ]
        if params.task == "instance":
            columns += [f"n_{name}" for name in params.classes] + ["n_crowd"]
            objects = [o for row in rows for o in row.pop("_objects")]
            table = pd.DataFrame(objects, columns=list(INSTANCE_COLUMNS))
            table.sort_values(["id", "instance"]).to_csv(out / INSTANCES, index=False)
        else:
            columns += [f"px_{name}" for name in params.classes] + ["px_ignored"]
        manifest = pd.DataFrame(rows).reindex(columns=columns).sort_values("id").reset_index(drop=True)
        _check_splits(manifest, cfg)
        manifest.to_csv(out / MANIFEST, index=False)
        source = report.describe_source(cfg)
        if cfg.layout == "coco" and params.task == "instance":
            source["category_ids"] = coco_category_ids(items, params.classes)
        data_report = report.build(manifest, params.classes, problems.records, source)
        (out / REPORT_JSON).write_text(report.to_json(data_report), encoding="utf-8")
        (out / REPORT_MD).write_text(report.to_markdown(data_report), encoding="utf-8")
    log.info("%s", report.summary_line(data_report, paths.ingest))
    for record in problems.records:
        log.warning("skipped: %s", record["message"])
    return manifest


def coco_category_ids(items: list, classes: list[str]) -> dict[str, int]:
    """{class: its ``category_id`` in the COCO annotation file} (what predict's COCO JSON uses again).

    A class the file names no annotation of gets the next id above the file's (not one of its others)."""
    found: dict[str, int] = {}
    for item in items:
        coco = getattr(item, "coco", None)
        if coco:
            for ident, name in json.loads(coco)["categories"].items():
                if isinstance(ident, str) and ident.lstrip("-").isdigit():
                    found.setdefault(name, int(ident))
    ids = {name: found[name] for name in classes if name in found}
    spare = max(ids.values(), default=0)
    for name in classes:
        if name not in ids:
            spare += 1
            ids[name] = spare
    return ids


def _check_splits(manifest: pd.DataFrame, cfg: IngestParams) -> None:
    """A dataset that brings its own split must give training and test images (evaluate scores the test split)."""
    if cfg.source != "folder" or (cfg.layout in _HASHED and cfg.split_lists is None):
        return
    for split in ("train", "test"):
        if (manifest["split"] == split).any():
            continue
        if cfg.layout == "split_folders":
            folder = getattr(cfg.split_dirs, split)
            where = f"layout: split_folders reads {folder}/ + {folder}{cfg.annot_suffix}/"
        else:
            where = f"ingest.split_lists.{split} names none that could be read"
        raise SegflowError(f"{cfg.path}: no {split} images ({where}); add them")
