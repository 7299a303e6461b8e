"""The one typed loader for params.yaml.

Every stage reads its hyperparameters through :func:`load_params`; nothing else
opens params.yaml. One pydantic model per section, unknown keys rejected with
their name (``extra="forbid"``), choices as ``Literal`` types. This module must
stay cheap to import (no torch, no smp): the Prefect flow and the CLI use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, ValidationError, field_validator, model_validator

from tasks._common import SegflowError

PARAMS_FILE = Path("params.yaml")

# The architectures of segmentation-models-pytorch 0.6 (smp.create_model's
# `arch`); a unit test keeps this list equal to smp's own mapping.
Arch = Literal[
    "Unet",
    "UnetPlusPlus",
    "MAnet",
    "Linknet",
    "FPN",
    "PSPNet",
    "DeepLabV3",
    "DeepLabV3Plus",
    "PAN",
    "UPerNet",
    "Segformer",
    "DPT",
]
Loss = Literal["ce", "dice", "focal", "lovasz", "dice_ce", "focal_dice"]
Precision = Literal["auto", "32", "16-mixed", "bf16-mixed"]
Accelerator = Literal["auto", "cpu", "gpu"]

#: Label value for pixels that count towards no class (padding, "void").
IGNORE_INDEX = 255
#: Object classes the built-in synthetic source can draw (tasks/_synthetic.py's shapes).
SYNTHETIC_OBJECT_CLASSES = 6  # a unit test keeps this equal to _synthetic.MAX_OBJECT_CLASSES


class ParamsError(SegflowError):
    """params.yaml is missing, unreadable or invalid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Section):
    """Where each stage writes; dvc.yaml refers to these as ``${paths.<stage>}``."""

    ingest: Path = Path("data/ingest")
    augment: Path = Path("data/augment")
    train: Path = Path("data/train")
    evaluate: Path = Path("data/evaluate")

    def under(self, root: Path) -> Paths:
        """The same layout re-rooted under ``root`` (tests, benchmarks)."""
        return Paths(**{name: Path(root) / value for name, value in self.model_dump().items()})


class SyntheticParams(_Section):
    """The built-in demo dataset: seeded multi-class scenes."""

    num_images: int = Field(240, ge=3)
    image_size: int = Field(96, ge=16, le=2048)
    min_objects: int = Field(2, ge=0)
    max_objects: int = Field(6, ge=1)
    #: Relative frequency of each object class (classes[1:]); imbalance on purpose.
    class_weights: list[NonNegativeFloat] | None = None
    noise: float = Field(0.05, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _objects_range(self) -> SyntheticParams:
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) is larger than max_objects ({self.max_objects})")
        if self.class_weights is not None and not any(self.class_weights):
            raise ValueError("class_weights are all zero; give at least one object class a positive weight")
        return self


class IngestParams(_Section):
    source: Literal["synthetic"] = "synthetic"
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    synthetic: SyntheticParams = SyntheticParams()

    @model_validator(mode="after")
    def _fractions(self) -> IngestParams:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave some data for training")
        return self


class NormalizeParams(_Section):
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


class AugmentParams(_Section):
    #: Training crop (pixels, square); images are padded first when smaller.
    crop_size: int = Field(96, ge=16)
    #: Eval images are padded so height and width divide by this (the model's stride).
    pad_divisor: int = Field(32, ge=1)
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    vflip: float = Field(0.5, ge=0.0, le=1.0)
    rotate90: float = Field(0.5, ge=0.0, le=1.0)
    #: Probability of a small random scale/rotate/shift.
    affine: float = Field(0.3, ge=0.0, le=1.0)
    brightness_contrast: float = Field(0.5, ge=0.0, le=1.0)
    brightness_limit: float = Field(0.2, ge=0.0, le=1.0)
    contrast_limit: float = Field(0.2, ge=0.0, le=1.0)
    gauss_noise: float = Field(0.2, ge=0.0, le=1.0)
    normalize: NormalizeParams = NormalizeParams()
    preview_samples: int = Field(6, ge=1, le=64)


class TrainParams(_Section):
    arch: Arch = "Unet"
    encoder: str = "resnet18"
    encoder_depth: int = Field(5, ge=3, le=5)
    #: Decoder widths, one per encoder stage (Unet-like archs only); null = smp's default.
    decoder_channels: list[int] | None = None
    #: null = random init; or a path to a local weights file (.safetensors / .pth)
    #: holding encoder or whole-model weights. Hub names ("imagenet") need network.
    encoder_weights: str | None = None
    loss: Loss = "dice_ce"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(16, ge=1)
    num_workers: int = Field(0, ge=0)
    accelerator: Accelerator = "auto"
    #: Devices (GPUs) to train on. Only 1 so far: see the validator.
    devices: int = Field(1, ge=1)
    precision: Precision = "auto"

    @field_validator("encoder_weights")
    @classmethod
    def _weights(cls, value: str | None) -> str | None:
        return None if value in (None, "", "none", "null") else value

    @model_validator(mode="after")
    def _decoder_depth(self) -> TrainParams:
        if self.devices != 1:
            # Validation counts are not yet gathered across processes, so each GPU
            # would checkpoint on its own share of the data: refuse rather than mislead.
            raise ValueError("training on several devices is not supported yet; set train.devices: 1")
        if self.decoder_channels is not None and len(self.decoder_channels) != self.encoder_depth:
            raise ValueError(
                f"decoder_channels has {len(self.decoder_channels)} entries but encoder_depth is "
                f"{self.encoder_depth}; give one width per encoder stage"
            )
        return self


class EvaluateParams(_Section):
    batch_size: int = Field(8, ge=1)
    #: How many test images the predictions preview shows.
    preview_samples: int = Field(6, ge=1, le=64)


class Params(_Section):
    """The whole params.yaml."""

    seed: int = 42
    classes: list[str] = Field(default_factory=lambda: ["background", "disk", "box", "triangle"])
    paths: Paths = Paths()
    ingest: IngestParams = IngestParams()
    augment: AugmentParams = AugmentParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        if len(value) < 2:
            raise ValueError("need at least 2 classes (background and one object class)")
        if len(set(value)) != len(value):
            raise ValueError(f"class names repeat: {value}")
        if len(value) >= IGNORE_INDEX:
            raise ValueError(f"at most {IGNORE_INDEX - 1} classes (label {IGNORE_INDEX} means ignore)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        weights = self.ingest.synthetic.class_weights
        if weights is not None and len(weights) != len(self.classes) - 1:
            raise ValueError(
                f"ingest.synthetic.class_weights has {len(weights)} entries; "
                f"give one per object class ({len(self.classes) - 1}: {self.classes[1:]})"
            )
        if self.ingest.source == "synthetic" and len(self.classes) - 1 > SYNTHETIC_OBJECT_CLASSES:
            raise ValueError(
                f"classes: the synthetic source draws at most {SYNTHETIC_OBJECT_CLASSES} object classes, "
                f"got {len(self.classes) - 1}; list at most {SYNTHETIC_OBJECT_CLASSES + 1} classes"
            )
        # The encoder halves the resolution encoder_depth times; inputs must divide evenly.
        stride = 2**self.train.encoder_depth
        for key in ("crop_size", "pad_divisor"):
            value = getattr(self.augment, key)
            if value % stride:
                raise ValueError(
                    f"augment.{key} is {value}, not a multiple of {stride} (2**train.encoder_depth); "
                    f"use e.g. {max(stride, round(value / stride) * stride)}"
                )
        return self


def _describe(error: ValidationError, source: Path) -> str:
    """One line per problem, each naming the key, e.g. ``train.lr: ...``."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}' (misspelt? remove it or fix the name)")
            continue
        message = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        # Cross-key checks see a whole section as their input: their message names the keys.
        got = "" if isinstance(value, dict) or item["type"] == "value_error" else f" (got {value!r})"
        lines.append(f"{source}: {key + ': ' if key else ''}{message}{got}")
    return "; ".join(lines)


def parse_params(data: dict | None, source: Path | str = PARAMS_FILE) -> Params:
    """Validate an already-parsed params mapping.

    Raises:
        ParamsError: one line naming every bad key.
    """
    try:
        return Params.model_validate(data or {})
    except ValidationError as error:
        raise ParamsError(_describe(error, Path(source))) from None


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate params.yaml.

    Raises:
        ParamsError: the file is missing, is not YAML, or holds a bad key or value.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the project root (where dvc.yaml is)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        detail = " ".join(str(error).split())
        raise ParamsError(f"{path}: not valid YAML ({detail})") from None
    if data is not None and not isinstance(data, dict):
        raise ParamsError(f"{path}: must be a mapping of sections, got {type(data).__name__}")
    return parse_params(data, path)
