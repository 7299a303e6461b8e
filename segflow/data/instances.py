"""Instance-segmentation sources: a user's object annotations as one instance-id image per picture.

Every layout is read into the same stored form: an instance-id array (H, W)
uint16 (0 = background, 1..N = the objects, numbered consecutively in a fixed
order) and a table ``[{"instance": k, "class": c, "crowd": bool}]`` where ``c``
indexes ``classes`` (the object categories; background is not one of them).

Layouts (``discover(root, layout, ...)``):

- ``coco``: ``<root>/<images_dir>/`` and a COCO JSON file ``<root>/<annotations>``.
  Categories are matched to ``classes`` by name. Segmentations are polygons,
  uncompressed RLE (``counts`` a list) or compressed RLE (``counts`` a string),
  decoded with pycocotools. ``iscrowd: 1`` annotations are kept as crowd
  (ignore) regions. Objects are numbered, and painted, in ascending annotation
  id: where annotations overlap, the later one (higher id) covers the earlier
  ones. ``bbox`` and ``area`` are not read (they follow from the masks). A
  file under ``images_dir`` that the JSON does not list is a problem
  (``not_in_annotations``); an image listed with no annotations is kept as a
  negative (no objects), or refused with ``negatives="refuse"``. An image's
  ``file_name`` is its path under ``images_dir``.
- ``instance_png``: ``<root>/<images_dir>/`` and ``<root>/<masks_dir>/`` paired by
  file stem (after ``image_suffix`` / ``mask_suffix``); each mask is a one-channel
  PNG (8- or 16-bit) with one value per object, 0 = background; objects are
  numbered by ascending value. The class of a value comes from ``class_table``
  ({value: class name}); without one, a single class is every object's. With
  ``cityscapes=True`` a value is ``label_id * 1000 + n`` (Cityscapes'
  ``*_instanceIds.png``): ``class_table`` maps label ids to class names, and
  without one label id ``k`` is ``classes[k - 1]``; values below 1000 (stuff,
  and instance classes' unsplit groups) are background.
- ``per_object``: the Data Science Bowl 2018 layout ``<root>/<id>/images/<image>``
  (exactly one image) and ``<root>/<id>/masks/*`` (one binary mask per object,
  nonzero = object; an empty ``masks/`` folder is a negative). One class only.
  Objects are numbered and painted in sorted mask path order: a later mask
  covers an earlier one where they overlap; two identical masks are a problem.
  Other files directly under ``<root>`` are not read.
- ``label_components``: ``<root>/<images_dir>/`` and ``<root>/<masks_dir>/`` paired
  by stem; every 4-connected region of the mask's pixels equal to
  ``component_value`` is one object of ``classes[0]`` (ISBI 2012: each region
  of the cell label is a cell), numbered in scipy's label order (raster order of
  each region's first pixel). Regions smaller than ``min_area`` are dropped
  without a problem (slivers cut by the image border).

In every layout but ``label_components`` an object with fewer than ``min_area``
visible pixels (after overlaps are painted) is a problem, as is an image with
no object at all under ``negatives="refuse"``.

Files are only read, never written. A sample's id is the image's path under its
folder without the extension, ``/`` written ``__`` (``per_object``: the folder name).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from pycocotools import mask as coco_mask
from scipy import ndimage

from segflow.data import decode
from segflow.data.checks import Problem, Problems
from segflow.data.folder import _JUNK, _inner, _root, _strip, _Walker
from segflow.errors import SegflowError

LAYOUTS = ("coco", "instance_png", "per_object", "label_components")
NEGATIVES = ("keep", "refuse")
#: The most objects an instance-id image (uint16) can number.
MAX_INSTANCES = 65535
#: How far (pixels) a polygon vertex may lie outside the image before it is a problem.
POLYGON_TOLERANCE = 0.5


@dataclass(frozen=True)
class InstanceItem:
    """One image and its object annotations, as plain data (cheap to pickle to a worker process).

    ``image_name`` and ``annotation_name`` are how messages and the report name the image file and the
    annotation source (``<json> (image <file_name>)``, the mask file, or the ``masks/`` folder).
    """

    id: str
    image: Path
    image_name: str
    annotation_name: str
    split: str | None = None
    #: one of :data:`LAYOUTS`.
    layout: str = "instance_png"
    #: instance_png, label_components: the mask file.
    mask: Path | None = None
    #: per_object: the object masks in painting order, and how messages name each.
    object_masks: tuple[Path, ...] = ()
    object_names: tuple[str, ...] = ()
    #: coco: the image's entry and its annotations (sorted by id), as canonical JSON.
    coco: str | None = None
    #: coco: the class index of each annotation, in the same order.
    coco_classes: tuple[int, ...] = ()
    #: instance_png: (value, or Cityscapes label id) -> class index; None: every object is class 0.
    value_classes: tuple[tuple[int, int], ...] | None = None
    #: instance_png: whether value_classes came from the user's table (it shapes the messages).
    class_table_given: bool = False
    cityscapes: bool = False
    #: label_components: the mask value whose connected regions are the objects.
    component_value: int | None = None
    min_area: int = 2
    negatives: str = "keep"

    def read(self, max_pixels: int, scale_16bit: str) -> tuple[np.ndarray, np.ndarray, list[dict], dict]:
        """Decode the image and its annotations into the stored form.

        Returns:
            image (H, W, 1 or 3) uint8, instances (H, W) uint16, the table
            ``[{"instance", "class", "crowd"}]``, and provenance: ``source_image``, ``source_mask``
            (the names) and ``sha256_image``, ``sha256_mask`` (of the files' bytes; coco: of this image's
            canonical JSON; per_object: of the lines ``<mask name>\\t<sha256>`` of its masks in order).

        Raises:
            Problem: anything wrong with this image or its annotations.
        """
        data = _read(self.image, self.image_name)
        img, _ = decode.open_file(data, self.image_name, max_pixels)
        image = decode.image_array(img, self.image_name, scale_16bit)
        provenance = {
            "source_image": self.image_name,
            "source_mask": self.annotation_name,
            "sha256_image": hashlib.sha256(data).hexdigest(),
        }
        size = image.shape[:2]
        if self.layout == "coco":
            instances, table, provenance["sha256_mask"] = self._coco(size)
        elif self.layout == "per_object":
            instances, table, provenance["sha256_mask"] = self._per_object(size, max_pixels)
        else:
            values, provenance["sha256_mask"] = _mask_values(self.mask, self.annotation_name, max_pixels)
            _check_size(values, size, self.annotation_name, self.image_name)
            if self.layout == "instance_png":
                instances, table = self._instance_png(values)
            else:
                instances, table = self._components(values)
        if not table and self.negatives == "refuse":
            raise Problem("image_without_annotations", self.image_name)
        return image, instances, table, provenance

    def _coco(self, size: tuple[int, int]) -> tuple[np.ndarray, list[dict], str]:
        entry = json.loads(self.coco)
        height, width = size
        if (entry["width"], entry["height"]) != (width, height):
            raise Problem(
                "annotated_size",
                self.annotation_name,
                listed=f"{entry['width']}x{entry['height']}",
                image=self.image_name,
                actual=f"{width}x{height}",
            )
        annotations = entry["annotations"]
        if len(annotations) > MAX_INSTANCES:
            raise Problem("too_many_instances", self.annotation_name, count=len(annotations))
        instances = np.zeros(size, dtype=np.uint16)
        drawn, table = [], []
        for number, (annotation, cls) in enumerate(zip(annotations, self.coco_classes, strict=True), 1):
            region = _coco_region(annotation, height, width, self.annotation_name)
            instances[region] = number
            drawn.append((f"annotation {annotation['id']}", int(region.sum())))
            table.append({"instance": number, "class": cls, "crowd": annotation.get("iscrowd", 0) == 1})
        _check_visible(instances, drawn, [self.annotation_name] * len(drawn), self.min_area)
        return instances, table, hashlib.sha256(self.coco.encode()).hexdigest()

    def _per_object(self, size: tuple[int, int], max_pixels: int) -> tuple[np.ndarray, list[dict], str]:
        if len(self.object_masks) > MAX_INSTANCES:
            raise Problem("too_many_instances", self.annotation_name, count=len(self.object_masks))
        instances = np.zeros(size, dtype=np.uint16)
        drawn, table, lines, seen = [], [], [], {}
        for number, (path, name) in enumerate(zip(self.object_masks, self.object_names, strict=True), 1):
            values, digest = _mask_values(path, name, max_pixels, colour=True)
            region = values.any(axis=2) if values.ndim == 3 else values != 0
            _check_size(region, size, name, self.image_name)
            pixels = hashlib.sha256(np.packbits(region).tobytes()).hexdigest()
            if pixels in seen:
                raise Problem("same_instance", name, other=seen[pixels])
            seen[pixels] = name
            instances[region] = number
            drawn.append(("its object", int(region.sum())))
            table.append({"instance": number, "class": 0, "crowd": False})
            lines.append(f"{name}\t{digest}\n")
        _check_visible(instances, drawn, list(self.object_names), self.min_area)
        return instances, table, hashlib.sha256("".join(lines).encode()).hexdigest()

    def _instance_png(self, values: np.ndarray) -> tuple[np.ndarray, list[dict]]:
        if self.cityscapes:
            values = np.where(values >= 1000, values, 0)
        found, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(values.shape)
        if found[0] < 0:
            raise Problem(
                "bad_mask_value",
                self.annotation_name,
                value=int(found[0]),
                pixels=int(counts[0]),
                expected="which is not an object value (0 = background, 1 and up = objects)",
                fix="save the mask as 8- or 16-bit grayscale",
            )
        if found[0] != 0:  # no background pixel at all
            found, counts, inverse = np.concatenate([[0], found]), np.concatenate([[0], counts]), inverse + 1
        if len(found) - 1 > MAX_INSTANCES:
            raise Problem("too_many_instances", self.annotation_name, count=len(found) - 1)
        lookup = dict(self.value_classes) if self.value_classes is not None else None
        table = []
        for number, (value, pixels) in enumerate(zip(found[1:].tolist(), counts[1:].tolist(), strict=True), 1):
            key = value // 1000 if self.cityscapes else value
            cls = 0 if lookup is None else lookup.get(key)
            if cls is None:
                raise self._unmapped(value, key, pixels)
            if pixels < max(self.min_area, 1):
                raise Problem(
                    "small_instance",
                    self.annotation_name,
                    what=f"object value {value}",
                    pixels=pixels,
                    hidden="",
                    min_area=self.min_area,
                )
            table.append({"instance": number, "class": cls, "crowd": False})
        return inverse.astype(np.uint16), table

    def _unmapped(self, value: int, key: int, pixels: int) -> Problem:
        if self.cityscapes and not self.class_table_given:
            expected = (
                f"whose label id {key} (value // 1000) is not 1-{len(self.value_classes)} (label id k is classes[k-1])"
            )
            fix = "map Cityscapes label ids to class names with ingest.instance_classes"
        elif self.cityscapes:
            expected = f"whose label id {key} (value // 1000) ingest.instance_classes does not map to a class"
            fix = "add the label id to ingest.instance_classes"
        else:
            expected, fix = "which ingest.instance_classes does not map to a class", "add it to ingest.instance_classes"
        return Problem("bad_mask_value", self.annotation_name, value=value, pixels=pixels, expected=expected, fix=fix)

    def _components(self, values: np.ndarray) -> tuple[np.ndarray, list[dict]]:
        labels, count = _label(values == self.component_value, 4)
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        kept = np.flatnonzero(areas[1:] >= self.min_area) + 1  # smaller regions: slivers, dropped
        if len(kept) > MAX_INSTANCES:
            raise Problem("too_many_instances", self.annotation_name, count=len(kept))
        lookup = np.zeros(count + 1, dtype=np.uint16)
        lookup[kept] = np.arange(1, len(kept) + 1)
        table = [{"instance": k, "class": 0, "crowd": False} for k in range(1, len(kept) + 1)]
        return lookup[labels], table


def _read(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise Problem("unreadable", name, reason=error.strerror or type(error).__name__) from None


def _mask_values(path: Path, name: str, max_pixels: int, colour: bool = False) -> tuple[np.ndarray, str]:
    """A mask file's values (H, W) (with ``colour``, RGB masks stay (H, W, 3)), and the sha256 of its bytes."""
    data = _read(path, name)
    img, _ = decode.open_file(data, name, max_pixels)
    values = decode.mask_array(img, name)
    if values.ndim == 3 and not colour:
        raise Problem(
            "unsupported_mode",
            name,
            mode="colour (RGB) mask",
            fix="save the instance mask as one channel (8- or 16-bit) with one value per object",
        )
    return values, hashlib.sha256(data).hexdigest()


def _check_size(mask: np.ndarray, size: tuple[int, int], mask_name: str, image_name: str) -> None:
    if mask.shape[:2] != size:
        (mh, mw), (ih, iw) = mask.shape[:2], size
        raise Problem("size_mismatch", mask_name, mask_size=f"{mw}x{mh}", image=image_name, image_size=f"{iw}x{ih}")


def _check_visible(instances: np.ndarray, drawn: list[tuple[str, int]], files: list[str], min_area: int) -> None:
    """Every painted object keeps at least ``min_area`` (and at least one) visible pixels."""
    visible = np.bincount(instances.ravel(), minlength=len(drawn) + 1)
    for number, ((what, area), file) in enumerate(zip(drawn, files, strict=True), 1):
        if visible[number] < max(min_area, 1):
            hidden = " once later ones are painted over it" if area > visible[number] else ""
            raise Problem(
                "small_instance", file, what=what, pixels=int(visible[number]), hidden=hidden, min_area=min_area
            )


def _coco_region(annotation: dict, height: int, width: int, name: str) -> np.ndarray:
    """One annotation's segmentation as an (H, W) bool mask."""
    seg, ident = annotation["segmentation"], annotation["id"]

    def bad(reason: str) -> Problem:
        return Problem("bad_segmentation", name, annotation=ident, reason=reason)

    if isinstance(seg, list):
        polygons = []
        for polygon in seg:
            if not isinstance(polygon, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in polygon
            ):
                raise bad("a polygon is not a list of numbers")
            if len(polygon) % 2:
                raise bad(f"a polygon has an odd number of coordinates ({len(polygon)})")
            for x, y in zip(polygon[0::2], polygon[1::2], strict=True):
                if not (math.isfinite(x) and math.isfinite(y)):
                    raise bad("a polygon has a coordinate that is not a finite number")
                tol = POLYGON_TOLERANCE
                if not (-tol <= x <= width + tol and -tol <= y <= height + tol):
                    raise Problem("polygon_outside", name, annotation=ident, x=x, y=y, width=width, height=height)
            if len(polygon) >= 6:  # fewer than 3 vertices enclose nothing (and 4 numbers would read as a box)
                polygons.append([float(v) for v in polygon])
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if seg["size"] != [height, width]:
            raise bad(f"its RLE size {seg['size']} (height, width) is not the image's [{height}, {width}]")
        counts = seg["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                raise bad("its RLE counts are not all non-negative integers")
            if sum(counts) != height * width:  # pycocotools would read past the runs, or refuse
                raise bad(f"its RLE covers {sum(counts)} pixels, not the image's {height * width}")
            rle = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        elif isinstance(counts, str):
            try:
                counts_list = _rle_counts(counts)
            except ValueError as error:
                raise bad(f"its compressed RLE counts cannot be read ({error})") from None
            total = sum(counts_list)
            if total != height * width or min(counts_list, default=0) < 0:
                raise bad(f"its compressed RLE covers {total} pixels, not the image's {height * width}")
            rle = {"size": [height, width], "counts": counts.encode("ascii")}
        else:
            raise bad("its RLE counts are neither a list nor a string")
    else:
        raise bad("its segmentation is neither polygons nor RLE")
    try:
        with warnings.catch_warnings():  # pycocotools 2.0 under numpy 2: "__array__ ... copy keyword"
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            return coco_mask.decode(rle).astype(bool)
    except (ValueError, TypeError, OverflowError) as error:
        raise bad(f"pycocotools cannot decode it ({error})") from None


def _rle_counts(text: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string (each a 5-bit-per-character varint, delta-coded
    against the run two back from the third run on), to check its total before decoding."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise ValueError("truncated")
            code = ord(text[position]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"character {text[position]!r}")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def _label(region: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, not {connectivity!r}")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels, count = ndimage.label(region, structure=structure)
    return labels, int(count)


def cells_from_label(label: np.ndarray, cell_value, connectivity: int = 4) -> np.ndarray:
    """The connected regions of ``label == cell_value`` as instance ids (ISBI 2012: each cell region is a cell).

    Args:
        label: (H, W) label values.
        connectivity: 4 (regions touching only at a corner stay apart) or 8.

    Returns:
        (H, W) uint16: 0 outside the regions, 1..N numbered in raster order of each region's first pixel.

    Raises:
        ValueError: ``label`` is not 2-D, ``connectivity`` is neither 4 nor 8, or more than 65,535 regions.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be a 2-D array, not {label.ndim}-D")
    labels, count = _label(label == cell_value, connectivity)
    if count > MAX_INSTANCES:
        raise ValueError(f"{count} regions, more than an instance-id image holds ({MAX_INSTANCES})")
    return labels.astype(np.uint16)


# --- discovery ----------------------------------------------------------------------------------------------


def discover(
    root: Path,
    layout: str,
    *,
    classes: list[str],
    label: str,
    problems: Problems,
    images_dir: str = "images",
    masks_dir: str = "masks",
    annotations: str | None = None,
    class_table: dict[int, str] | None = None,
    cityscapes: bool = False,
    min_area: int = 2,
    negatives: str = "keep",
    component_value: int | None = None,
    image_suffix: str = "",
    mask_suffix: str = "",
) -> list[InstanceItem]:
    """Every image and its object annotations under ``root`` in ``layout``, sorted by id.

    Args:
        classes: the object categories (no background).
        label: how file names start in messages (e.g. ``data/raw/coco/``).
        annotations: coco: the JSON file's path relative to the dataset folder.
        class_table: instance_png: {mask value (Cityscapes: label id): class name}.
        cityscapes: instance_png: values are ``label_id * 1000 + n``.
        min_area: the fewest visible pixels an object may have (label_components: smaller regions are dropped).
        negatives: ``keep`` images without objects, or ``refuse`` them (a problem).
        component_value: label_components: the mask value whose connected regions are the objects.
        image_suffix, mask_suffix: instance_png, label_components: stripped from the stems before pairing.

    Raises:
        SegflowError: a setting that does not fit the layout, a missing folder, an unreadable or malformed
            COCO JSON, or (``on_bad: stop``) the first problem.
    """
    if layout not in LAYOUTS:
        raise SegflowError(f"instance layout {layout!r} is not one of {', '.join(LAYOUTS)}; fix ingest.layout")
    if negatives not in NEGATIVES:
        raise SegflowError(f"ingest.negatives: {negatives!r} is not one of {', '.join(NEGATIVES)}")
    if not classes:
        raise SegflowError("classes: lists no object category; name at least one")
    if isinstance(min_area, bool) or not isinstance(min_area, int) or min_area < 1:
        raise SegflowError(f"ingest.min_area: {min_area!r} must be a whole number of pixels, 1 or more")
    common = {"min_area": min_area, "negatives": negatives}
    if layout == "coco":
        items = _discover_coco(root, classes, label, problems, images_dir, annotations, common)
    elif layout == "per_object":
        if len(classes) > 1:
            raise SegflowError(
                f"ingest.layout: per_object holds one class (one binary mask per object), but classes lists "
                f"{len(classes)} ({', '.join(classes)}); keep one class, or use the coco or instance_png layout"
            )
        items = _discover_per_object(root, label, problems, common)
    else:
        if layout == "instance_png":
            common |= _value_classes(classes, class_table, cityscapes)
        else:
            if isinstance(component_value, bool) or not isinstance(component_value, int):
                raise SegflowError(
                    "ingest.layout: label_components needs the mask value whose regions are the objects "
                    f"(component_value, e.g. 255 for ISBI 2012's cells); got {component_value!r}"
                )
            common["component_value"] = component_value
        items = _discover_paired(
            root, layout, label, problems, images_dir, masks_dir, image_suffix, mask_suffix, common
        )
    return sorted(items, key=lambda item: item.id)


def _value_classes(classes: list[str], class_table: dict[int, str] | None, cityscapes: bool) -> dict:
    """instance_png's mapping of values (or Cityscapes label ids) to class indices, as InstanceItem fields."""
    if class_table is None:
        if cityscapes:
            return {"cityscapes": True, "value_classes": tuple((k + 1, k) for k in range(len(classes)))}
        if len(classes) == 1:
            return {"cityscapes": False, "value_classes": None}
        raise SegflowError(
            f"ingest.layout: instance_png with {len(classes)} classes ({', '.join(classes)}) needs the class of "
            "each mask value: set ingest.instance_classes ({value: class name}), or ingest.cityscapes: true "
            "for label_id * 1000 + n values"
        )
    mapping = []
    for key, name in sorted(class_table.items()):
        if isinstance(key, bool) or not isinstance(key, int) or key < 1:
            raise SegflowError(
                f"ingest.instance_classes: key {key!r} is not a mask value (a whole number, 1 or more; 0 is background)"
            )
        if name not in classes:
            raise SegflowError(
                f"ingest.instance_classes: maps {key} to {name!r}, which is not in classes ({', '.join(classes)}); "
                "fix the name or add it to classes"
            )
        mapping.append((key, classes.index(name)))
    return {"cityscapes": cityscapes, "value_classes": tuple(mapping), "class_table_given": True}


def _discover_paired(
    source: Path,
    layout: str,
    label: str,
    problems: Problems,
    images_dir: str,
    masks_dir: str,
    image_suffix: str,
    mask_suffix: str,
    common: dict,
) -> list[InstanceItem]:
    root = _root(source, [images_dir, masks_dir], label, layout)
    walker = _Walker(root, label + _inner(source, root), problems)
    images, masks = root / images_dir, root / masks_dir
    image_files = {_strip(k, image_suffix): p for k, p in walker.files(images).items()}
    mask_files = {_strip(k, mask_suffix): p for k, p in walker.files(masks).items()}
    items = []
    for key in sorted(image_files.keys() | mask_files.keys()):
        image, mask = image_files.get(key), mask_files.get(key)
        if mask is None:
            expected = f"{walker.name(masks)}/{key.replace('__', '/')}{mask_suffix}.*"
            problems.add(Problem("image_without_mask", walker.name(image), expected=expected))
        elif image is None:
            expected = f"{walker.name(images)}/{key.replace('__', '/')}{image_suffix}.*"
            problems.add(Problem("mask_without_image", walker.name(mask), expected=expected))
        else:
            items.append(
                InstanceItem(key, image, walker.name(image), walker.name(mask), layout=layout, mask=mask, **common)
            )
    return items


def _discover_per_object(root: Path, label: str, problems: Problems, common: dict) -> list[InstanceItem]:
    if not root.is_dir():
        raise SegflowError(f"{label.rstrip('/:')}: is not a folder; fix ingest.path")
    walker = _Walker(root, label, problems)
    items = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.name.startswith(".") or folder.name in _JUNK:
            continue
        if folder.is_symlink() and walker._escapes(folder):
            continue
        images, masks = folder / "images", folder / "masks"
        found = walker.files(images) if images.is_dir() else {}
        if len(found) != 1:
            problems.add(
                Problem(
                    "not_one_image",
                    walker.name(folder),
                    found=f"{len(found)} images in images/" if images.is_dir() else "no images/ folder",
                    fix="keep one image and give the others folders of their own"
                    if len(found) > 1
                    else "add the image or remove the folder",
                )
            )
            continue
        (image,) = found.values()
        if not masks.is_dir():
            expected = f"{walker.name(masks)}/*.png"
            problems.add(Problem("image_without_mask", walker.name(image), expected=expected))
            continue
        paths = sorted(walker.files(masks).values(), key=lambda p: p.relative_to(masks).as_posix())
        items.append(
            InstanceItem(
                folder.name,
                image,
                walker.name(image),
                walker.name(masks) + "/",
                layout="per_object",
                object_masks=tuple(paths),
                object_names=tuple(walker.name(p) for p in paths),
                **common,
            )
        )
    return items


# --- COCO ---------------------------------------------------------------------------------------------------


def _load_json(path: Path, name: str) -> dict:
    if not path.is_file():
        raise SegflowError(
            f"{name}: not found; ingest.annotations names the COCO JSON file, relative to the dataset folder"
        )
    try:
        data = json.loads(path.read_bytes())
    except OSError as error:
        raise SegflowError(f"{name}: cannot be read ({error.strerror or type(error).__name__})") from None
    except UnicodeDecodeError:
        raise SegflowError(f"{name}: is not UTF-8 text, so not a COCO JSON file; re-export the annotations") from None
    except json.JSONDecodeError as error:
        raise SegflowError(
            f"{name}: is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
            "repair the file or re-export the annotations"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SegflowError(f"{name}: has no 'images' list, so it is not a COCO annotation file; re-export it as COCO")
    return data


def _entries(data: dict, key: str, required: dict[str, tuple], name: str) -> list[dict]:
    """The file's ``key`` list, each entry checked for the keys instance segmentation reads."""
    entries = data.get(key, [])
    if not isinstance(entries, list):
        raise SegflowError(f"{name}: '{key}' is not a list; fix the file or re-export it as COCO")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise SegflowError(f"{name}: {key}[{index}] is not an object; fix the file or re-export it as COCO")
        for field, types in required.items():
            value = entry.get(field)
            if value is None or isinstance(value, bool) or not isinstance(value, types):
                missing = "has no" if value is None else "has a malformed"
                extra = (
                    " (box-only annotations cannot make instance masks)"
                    if key == "annotations" and field == "segmentation" and value is None
                    else ""
                )
                raise SegflowError(
                    f"{name}: {key}[{index}] {missing} '{field}'{extra}; fix the file or re-export it as COCO"
                )
        if key == "images" and (entry["width"] < 1 or entry["height"] < 1):
            raise SegflowError(f"{name}: images[{index}] has a width or height below 1; fix the file")
    return entries


def _order(ident) -> tuple:
    return (1, ident) if isinstance(ident, str) else (0, ident)


def _discover_coco(
    source: Path,
    classes: list[str],
    label: str,
    problems: Problems,
    images_dir: str,
    annotations: str | None,
    common: dict,
) -> list[InstanceItem]:
    if not annotations:
        raise SegflowError(
            "ingest.layout: coco needs ingest.annotations, the COCO JSON file's path inside the dataset folder"
        )
    root = _root(source, [images_dir], label, "coco")
    walker = _Walker(root, label + _inner(source, root), problems)
    json_path = root / annotations
    json_name = walker.name(json_path)
    data = _load_json(json_path, json_name)
    ident = (int, str)
    images = _entries(data, "images", {"id": ident, "file_name": str, "width": int, "height": int}, json_name)
    anns = _entries(
        data,
        "annotations",
        {"id": ident, "image_id": ident, "category_id": ident, "segmentation": (list, dict)},
        json_name,
    )
    categories = {c["id"]: c["name"] for c in _entries(data, "categories", {"id": ident, "name": str}, json_name)}

    refused: set = set()  # image ids left out for a file-level problem
    entries = _unique_images(images, json_name, problems, refused)

    # Duplicate annotation ids: every image holding one is left out.
    by_id: dict = {}
    for ann in anns:
        by_id.setdefault(ann["id"], []).append(ann)
    for ann_id, same in sorted(by_id.items(), key=lambda kv: _order(kv[0])):
        if len(same) > 1:
            problems.add(
                Problem("same_annotation_id", json_name, count=len(same), what="annotation", key="id", id=ann_id)
            )
            refused |= {a["image_id"] for a in same}

    # Categories are matched to classes by name; an image with an unknown one is left out.
    unknown: dict[str, list[dict]] = {}
    for ann in anns:
        cat = ann["category_id"]
        if cat not in categories:
            unknown.setdefault(f"id {cat} (not among the file's categories)", []).append(ann)
        elif categories[cat] not in classes:
            unknown.setdefault(repr(categories[cat]), []).append(ann)
    for category, used in sorted(unknown.items()):
        holders = {a["image_id"] for a in used}
        problems.add(Problem("unknown_category", json_name, category=category, count=len(used), images=len(holders)))
        refused |= holders

    per_image: dict = {}
    for ann in anns:
        per_image.setdefault(ann["image_id"], []).append(ann)
    orphans = sorted((key for key in per_image if key not in entries), key=_order)
    if orphans:
        shown = ", ".join(repr(o) for o in orphans[:5]) + (", ..." if len(orphans) > 5 else "")
        count = sum(len(per_image[o]) for o in orphans)
        problems.add(Problem("orphan_annotations", json_name, count=count, ids=shown))

    images_root = root / images_dir
    files = walker.files(images_root)
    by_path = {path.relative_to(images_root).as_posix(): key for key, path in files.items()}
    listed: set[str] = set()
    items = []
    for image_id, entry in sorted(entries.items(), key=lambda kv: _order(kv[0])):
        rel = _file_name(entry["file_name"])
        listed.add(rel)
        if rel not in by_path:
            problems.add(Problem("listed_but_missing", json_name, id=entry["file_name"], what="image file"))
            continue
        if image_id in refused:
            continue
        key = by_path[rel]
        image_name = walker.name(files[key])
        own = sorted(per_image.get(image_id, []), key=lambda a: _order(a["id"]))
        if not own and common["negatives"] == "refuse":
            problems.add(Problem("image_without_annotations", image_name))
            continue
        canonical = json.dumps(
            {
                "file_name": entry["file_name"],
                "width": entry["width"],
                "height": entry["height"],
                "annotations": own,
                "categories": {str(a["category_id"]): categories[a["category_id"]] for a in own},
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        )
        items.append(
            InstanceItem(
                key,
                files[key],
                image_name,
                f"{json_name} (image {entry['file_name']})",
                layout="coco",
                coco=canonical,
                coco_classes=tuple(classes.index(categories[a["category_id"]]) for a in own),
                **common,
            )
        )
    for rel, key in sorted(by_path.items()):
        if rel not in listed:
            problems.add(Problem("not_in_annotations", walker.name(files[key]), annotations=json_name))
    return items


def _unique_images(images: list[dict], json_name: str, problems: Problems, refused: set) -> dict:
    """{image id: entry} of the entries whose id and file_name are each listed once (the others: problems)."""
    for field in ("id", "file_name"):
        seen: dict = {}
        for entry in images:
            seen.setdefault(entry[field], []).append(entry)
        for value, same in sorted(seen.items(), key=lambda kv: _order(kv[0])):
            if len(same) > 1:
                problems.add(
                    Problem("same_annotation_id", json_name, count=len(same), what="image", key=field, id=value)
                )
                refused |= {e["id"] for e in same}
    entries = {}
    for entry in images:
        entries.setdefault(entry["id"], entry)
    return entries


def _file_name(name: str) -> str:
    """A COCO file_name as a path under the images folder (Windows separators and a leading ./ tolerated)."""
    return PurePosixPath(name.replace("\\", "/")).as_posix().removeprefix("./")
