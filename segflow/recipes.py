"""Augmentation recipes: albumentations transforms written as data in params.yaml.

A recipe is a list of transforms, each a mapping of its albumentations class
name and its arguments (``{name: Affine, rotate: [-20, 20], p: 0.3}``), plus
two names of our own: ``crop`` (pad to ``augment.crop_size`` where smaller,
then a random crop of that size, so batches stack) and the compositions
``OneOf`` / ``SomeOf`` (``transforms: [...]``). The training pipeline is the
chosen preset, changed by ``augment.overrides``, followed by ``augment.train``;
normalisation is always added last, from ``augment.normalize``.

Names and arguments are checked when params load, against a catalogue of the
installed albumentations' transforms (``transforms.json``, written from the
library itself; a unit test keeps it equal). Loading params must stay cheap
(importing albumentations imports torch, seconds), so the catalogue is read as
JSON and albumentations is imported only where it is missing or stale.

Masks are class ids, so three rules hold for every transform built here
(tests/test_recipes.py checks them on every preset): a geometric transform moves
the mask with the image using nearest-neighbour interpolation (ids never
blend), pixels it invents (borders, padding) are labelled ``IGNORE_INDEX``,
and a constant border is the default so nothing is made up from reflections
unless asked for.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib.metadata
import inspect
import json
import random
from pathlib import Path
from typing import Any

import numpy as np

CATALOGUE = Path(__file__).with_name("transforms.json")
#: Our own recipe step: pad to crop_size (padding ignored), then a random crop of that size.
CROP = "crop"
COMPOSITIONS = ("OneOf", "SomeOf")
#: Label value of "no class"; equal to segflow.params.IGNORE_INDEX (kept here so this module imports nothing).
IGNORE = 255
#: cv2.INTER_NEAREST, cv2.INTER_NEAREST_EXACT.
NEAREST = (0, 6)

# Transforms a recipe cannot use, with the reason the error gives.
_UNUSABLE = {
    "Normalize": "segflow adds it last from augment.normalize; set the mean and std there",
    "ToFloat": "the pipeline works on uint8 images until normalisation",
    "FromFloat": "the pipeline works on uint8 images until normalisation",
    "Lambda": "it runs arbitrary code, which a params file cannot hold",
    "Mosaic": "it needs extra images per sample",
    "OverlayElements": "it needs overlay metadata per sample",
    "TextImage": "it needs text metadata per sample",
    "FDA": "it needs reference images per sample",
    "HistogramMatching": "it needs reference images per sample",
    "PixelDistributionAdaptation": "it needs reference images per sample",
    "MaskDropout": "it removes objects by instance, not class masks",
    **{
        name: "it needs bounding boxes, which segmentation samples do not carry"
        for name in ("AtLeastOneBBoxRandomCrop", "BBoxSafeRandomCrop", "RandomCropNearBBox", "RandomSizedBBoxSafeCrop")
    },
}

_FLIPS = [
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "VerticalFlip", "p": 0.5},
    {"name": "RandomRotate90", "p": 0.5},
]
_PHOTOMETRIC = [
    {"name": "RandomBrightnessContrast", "brightness_limit": 0.2, "contrast_limit": 0.2, "p": 0.5},
    {"name": "GaussNoise", "std_range": [0.02, 0.06], "p": 0.2},
]

#: The presets. ``default`` is the pipeline segflow has always used.
PRESETS: dict[str, list[dict[str, Any]]] = {
    "none": [{"name": CROP}],
    "light": [
        {"name": CROP},
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "RandomBrightnessContrast", "brightness_limit": 0.1, "contrast_limit": 0.1, "p": 0.3},
    ],
    "default": [
        {"name": CROP},
        *_FLIPS,
        {"name": "Affine", "scale": [0.85, 1.15], "rotate": [-20, 20], "translate_percent": [-0.05, 0.05], "p": 0.3},
        *_PHOTOMETRIC,
    ],
    "strong": [
        {"name": CROP},
        *_FLIPS,
        {
            "name": "Affine",
            "scale": [0.7, 1.3],
            "rotate": [-45, 45],
            "translate_percent": [-0.1, 0.1],
            "shear": [-10, 10],
            "p": 0.7,
        },
        {
            "name": "OneOf",
            "transforms": [
                {"name": "ElasticTransform", "alpha": 30, "sigma": 6},
                {"name": "GridDistortion", "num_steps": 5, "distort_limit": 0.3},
            ],
            "p": 0.3,
        },
        {"name": "RandomBrightnessContrast", "brightness_limit": 0.3, "contrast_limit": 0.3, "p": 0.7},
        {"name": "RandomGamma", "gamma_limit": [70, 150], "p": 0.3},
        {
            "name": "OneOf",
            "transforms": [
                {"name": "GaussianBlur", "blur_limit": [3, 5]},
                {"name": "GaussNoise", "std_range": [0.02, 0.1]},
            ],
            "p": 0.4,
        },
        {
            "name": "CoarseDropout",
            "num_holes_range": [1, 4],
            "hole_height_range": [0.05, 0.15],
            "hole_width_range": [0.05, 0.15],
            "p": 0.3,
        },
    ],
    # Ronneberger et al. (U-Net, 2015) on EM stacks: shifts, rotations, elastic deformation, grey-value changes.
    "microscopy": [
        {"name": CROP},
        *_FLIPS,
        {"name": "Affine", "scale": [0.85, 1.15], "rotate": [-20, 20], "translate_percent": [-0.05, 0.05], "p": 0.5},
        {"name": "ElasticTransform", "alpha": 30, "sigma": 6, "p": 0.5},
        {"name": "GridDistortion", "num_steps": 5, "distort_limit": 0.25, "p": 0.3},
        *_PHOTOMETRIC,
    ],
    # Driving scenes: scale jitter before the crop, left-right flips only (the sky stays up), colour.
    "street": [
        {"name": "RandomScale", "scale_limit": [-0.5, 1.0], "p": 1.0},
        {"name": CROP},
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "ColorJitter", "brightness": 0.25, "contrast": 0.25, "saturation": 0.25, "hue": 0.03, "p": 0.8},
        {"name": "GaussianBlur", "blur_limit": [3, 5], "p": 0.1},
    ],
}


def build_catalogue() -> dict:
    """The installed albumentations' 2-D transforms: kind and argument names (imports albumentations)."""
    import albumentations as A
    from albumentations.core.transforms_interface import BasicTransform, DualTransform, ImageOnlyTransform

    transforms = {}
    for name, cls in sorted(vars(A).items()):
        if not (inspect.isclass(cls) and issubclass(cls, BasicTransform)):
            continue
        if not cls.__module__.startswith("albumentations.augmentations") or name.endswith("3D"):
            continue
        if name == "CubicSymmetry":  # a 3-D transform without the suffix
            continue
        kind = "geometric" if issubclass(cls, DualTransform) else "pixel" if issubclass(cls, ImageOnlyTransform) else ""
        if not kind:
            continue
        signature = inspect.signature(cls.__init__).parameters
        args = [a for a, p in signature.items() if a != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        entry = {"kind": kind, "args": args}
        if "fill_mask" in signature:
            entry["fill_mask_default"] = signature["fill_mask"].default
        transforms[name] = entry
    return {"albumentations": importlib.metadata.version("albumentations"), "transforms": transforms}


@functools.cache
def catalogue() -> dict[str, dict]:
    """Transform name -> ``{"kind": "geometric" | "pixel", "args": [...]}`` for the installed albumentations."""
    try:
        stored = json.loads(CATALOGUE.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        stored = {}
    try:
        installed = importlib.metadata.version("albumentations")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is None or stored.get("albumentations") != installed:
        stored = build_catalogue()  # another version than the one the file was written from: ask the library
    return stored["transforms"]


def _closest(word: str, options: list[str] | dict) -> str:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.6)
    if not close:
        lowered = {o.lower(): o for o in options}
        close = [lowered[m] for m in difflib.get_close_matches(word.lower(), list(lowered), n=3, cutoff=0.6)]
    return f"; did you mean {', '.join(close)}?" if close else ""


def check_step(step: Any, where: str, pixel_only: bool = False) -> None:
    """Check one recipe step's name and argument names (values are checked when the pipeline is built).

    Args:
        where: how the error names the step, e.g. ``augment.train[2]``.
        pixel_only: only transforms that leave the geometry alone (evaluation).

    Raises:
        ValueError: one line naming the step, the problem and the closest valid names.
    """
    if not isinstance(step, dict) or not isinstance(step.get("name"), str):
        raise ValueError(
            f"{where}: give a mapping with the transform's name and its arguments, e.g. "
            "{name: HorizontalFlip, p: 0.5}" + (f" (got {step!r})" if step is not None else "")
        )
    name, args = step["name"], [a for a in step if a != "name"]
    known = catalogue()
    if name == CROP:
        if pixel_only:
            raise ValueError(f"{where}: crop changes the geometry; augment.eval takes pixel-level transforms only")
        if args:
            raise ValueError(f"{where}: crop takes no arguments (its size is augment.crop_size)")
        return
    if name in COMPOSITIONS:
        allowed = {"transforms", "p"} | ({"n", "replace"} if name == "SomeOf" else set())
        for arg in args:
            if arg not in allowed:
                raise ValueError(f"{where}: {name} has no argument '{arg}'{_closest(arg, sorted(allowed))}")
        children = step.get("transforms")
        if not isinstance(children, list) or not children:
            raise ValueError(f"{where}: {name} needs transforms: [a list of transforms to choose from]")
        for i, child in enumerate(children):
            if isinstance(child, dict) and child.get("name") in (CROP, *COMPOSITIONS):
                raise ValueError(f"{where}.transforms[{i}]: {child['name']} cannot sit inside {name}")
            check_step(child, f"{where}.transforms[{i}]", pixel_only)
        return
    if name in _UNUSABLE:
        raise ValueError(f"{where}: {name} cannot be used in a recipe: {_UNUSABLE[name]}")
    if name not in known:
        raise ValueError(
            f"{where}: unknown transform '{name}'{_closest(name, known)} "
            "(any albumentations 2-D transform by its class name, or crop, OneOf, SomeOf)"
        )
    entry = known[name]
    for arg in args:
        if arg not in entry["args"]:
            raise ValueError(
                f"{where}: {name} has no argument '{arg}'{_closest(arg, entry['args'])} "
                f"(its arguments: {', '.join(entry['args'])})"
            )
    if pixel_only and entry["kind"] == "geometric":
        raise ValueError(
            f"{where}: {name} moves or masks pixels, but evaluation scores predictions against the untouched "
            "masks; augment.eval takes pixel-level transforms only (e.g. CLAHE, ToGray)"
        )
    if step.get("mask_interpolation", 0) not in NEAREST:
        raise ValueError(
            f"{where}: {name} mask_interpolation must be nearest (0): masks hold class ids, which must not blend"
        )
    if step.get("fill_mask") not in (None, IGNORE):
        raise ValueError(
            f"{where}: {name} fill_mask would label the pixels it invents as class {step['fill_mask']}; "
            f"leave it out (segflow labels them {IGNORE}, ignored)"
        )


def find_step(steps: list[dict], name: str) -> list[tuple[list[dict], int]]:
    """Where ``name`` sits: (the list holding it, its index), at the top or inside a composition."""
    found = [(steps, i) for i, step in enumerate(steps) if step["name"] == name]
    for step in steps:
        if step["name"] in COMPOSITIONS:
            found += [(step["transforms"], i) for i, child in enumerate(step["transforms"]) if child["name"] == name]
    return found


def names(steps: list[dict]) -> list[str]:
    """The albumentations transforms a recipe names, compositions' members included (sorted)."""
    names = {s["name"] for s in steps} | {
        c["name"] for s in steps if s["name"] in COMPOSITIONS for c in s["transforms"]
    }
    return sorted(names - {CROP, *COMPOSITIONS})


def resolve(preset: str, overrides: dict[str, dict | None], extra: list) -> list[dict]:
    """The training recipe: ``preset``, each override applied by transform name, then ``extra`` appended.

    Args:
        overrides: transform name -> arguments to change (merged into the preset's), or None to remove it.
            A name may sit inside a ``OneOf``; removing a composition's last transform removes it.

    Raises:
        ValueError: an override names a transform the preset lacks, or one it holds more than once.
    """
    steps = copy.deepcopy(PRESETS[preset])
    for name, change in overrides.items():
        where = find_step(steps, name)
        if len(where) != 1:
            present = names(steps)
            problem = "has no" if not where else f"holds {len(where)} of"
            raise ValueError(
                f"overrides.{name}: preset {preset} {problem} {name}{_closest(name, present)} (it has: "
                f"{', '.join(present) or 'nothing but crop'}); add new transforms with augment.train"
            )
        holder, index = where[0]
        if change is None:
            del holder[index]
            steps = [s for s in steps if s["name"] not in COMPOSITIONS or s["transforms"]]
        elif isinstance(change, dict) and "name" not in change:
            holder[index].update(copy.deepcopy(change))
        else:
            raise ValueError(f"overrides.{name}: give its arguments to change ({{p: 0.2}}), or null to remove it")
    return steps + copy.deepcopy(list(extra))


def _make(step: dict, A):
    """One albumentations transform from a checked step, with segflow's mask rules applied."""
    import cv2

    name, args = step["name"], {k: v for k, v in step.items() if k != "name"}
    if name in COMPOSITIONS:
        children = [_make(child, A) for child in args.pop("transforms")]
        return getattr(A, name)(children, **args)
    signature = catalogue()[name]
    if "border_mode" in signature["args"]:
        args.setdefault("border_mode", cv2.BORDER_CONSTANT)
    if "fill_mask" in signature["args"] and signature.get("fill_mask_default") is not None:
        args.setdefault("fill_mask", IGNORE)  # dropouts default to leaving the mask alone: keep that
    try:
        return getattr(A, name)(**args)
    except (ValueError, TypeError) as error:  # pydantic's ValidationError is a ValueError
        detail = " ".join(str(error).split())[:300]
        raise ValueError(f"{name}: bad arguments {args} ({detail})") from None


def build(steps: list[dict], crop_size: int | None) -> list:
    """Albumentations transforms for ``steps`` (``crop`` becomes pad-then-random-crop to ``crop_size``).

    Raises:
        ValueError: a transform refuses its arguments (names the transform and the problem).
    """
    import albumentations as A
    import cv2

    out = []
    for step in steps:
        if step["name"] == CROP:
            pad = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": IGNORE}
            out += [
                A.PadIfNeeded(min_height=crop_size, min_width=crop_size, **pad),
                A.RandomCrop(height=crop_size, width=crop_size),
            ]
        else:
            out.append(_make(step, A))
    return out


def with_crop(steps: list[dict]) -> list[dict]:
    """``steps`` with a crop: where the recipe puts it, else first (cheapest: later transforms see the crop)."""
    return steps if any(s.get("name") == CROP for s in steps) else [{"name": CROP}, *steps]


def write_catalogue(path: Path = CATALOGUE) -> None:
    """Rewrite ``transforms.json`` from the installed albumentations (after upgrading it)."""
    path.write_text(json.dumps(build_catalogue(), indent=1, sort_keys=True) + "\n", encoding="utf-8")


def reseed(pipeline: Any, seed: int | None) -> Any:
    """Seed an albumentations pipeline so that its transforms take turns drawing from one random stream.

    albumentations 2.0's own seeding (``Compose(seed=...)`` and ``Compose.set_random_seed``) gives every
    transform inside the pipeline a generator made from the same seed, so each draws the same numbers: all
    transforms with the same ``p`` are applied together or skipped together (a horizontal flip always comes
    with the vertical flip, the rotation and every warp of p 0.5), and half the samples are not augmented at
    all. Generators shared by the whole pipeline make the draws independent and still reproducible
    (tests/test_recipes.py). Returns the pipeline.
    """
    pipeline.seed = seed
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return pipeline


if __name__ == "__main__":
    write_catalogue()
