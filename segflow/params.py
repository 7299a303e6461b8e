"""The one typed loader for params.yaml.

Every stage reads its hyperparameters through :func:`load_params`; nothing else
opens params.yaml. One pydantic model per section, unknown keys rejected with
their name (``extra="forbid"``), choices as ``Literal`` types. This module must
stay cheap to import (no torch, no smp): the Prefect flow and the CLI use it.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from segflow import recipes
from segflow.errors import SegflowError

PARAMS_FILE = Path("params.yaml")

# The architectures of segmentation-models-pytorch 0.6 (smp.create_model's
# `arch`; a unit test keeps them equal to smp's own mapping), then FCN and
# SegNet, which smp lacks (segflow/semantic/archs.py).
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
    "FCN",
    "SegNet",
]
Loss = Literal["ce", "dice", "focal", "lovasz", "dice_ce", "focal_dice"]
Precision = Literal["auto", "32", "16-mixed", "bf16-mixed"]
Accelerator = Literal["auto", "cpu", "gpu"]

#: Label value for pixels that count towards no class (padding, "void").
IGNORE_INDEX = 255
#: Object classes the built-in synthetic source can draw (segflow/data/synthetic.py's shapes).
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
    export: Path = Path("data/export")
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


#: One 8-bit colour channel value.
Channel = Annotated[int, Field(ge=0, le=255)]
RGB = tuple[Channel, Channel, Channel]
#: Mask values as they are stored (up to 16-bit grayscale).
RawValue = Annotated[int, Field(ge=0, le=65535)]


Split = Literal["train", "val", "test"]
#: The ingest layouts of task: instance (the others are semantic).
INSTANCE_LAYOUTS = ("coco", "instance_png", "per_object", "label_components")


class SplitDirs(_Section):
    """``layout: split_folders``: the folder of each split (its masks sit in ``<folder><annot_suffix>``).

    ``val`` may be null: no validation split (the last epoch is kept), e.g. to score a dataset's val folder
    as the test split while its real test split stays held out.
    """

    train: str = "train"
    val: str | None = "val"
    test: str = "test"

    @model_validator(mode="after")
    def _distinct(self) -> SplitDirs:
        named = [d for d in (self.train, self.val, self.test) if d is not None]
        if len(set(named)) < len(named):
            raise ValueError(f"ingest.split_dirs names one folder for two splits ({named}); give each its own")
        return self


class IngestParams(_Section):
    """Where the dataset comes from and how its files are read (see docs/datasets.md)."""

    #: synthetic: the built-in demo scenes; folder: the user's images and masks at ``path``.
    source: Literal["synthetic", "folder"] = "synthetic"
    #: A folder or an archive (.zip, .tar, .tar.gz, .tgz); relative to the project root, or absolute.
    #: dvc.yaml lists it as a dependency of ingest, so a change to the data reruns the pipeline.
    path: Path = Path("data/raw")
    #: paired: <path>/<images_dir> + <path>/<masks_dir>, split by a seeded hash;
    #: split_folders: <path>/train + <path>/trainannot, ... with the split kept as given.
    #: task: instance: coco (<images_dir>/ + the COCO JSON ``annotations``), instance_png (<masks_dir>/ holds
    #: one value per object), per_object (<id>/images/<id>.png + <id>/masks/*.png, Data Science Bowl 2018),
    #: label_components (each connected region of mask value ``component_value`` is one object).
    layout: Literal["paired", "split_folders", "coco", "instance_png", "per_object", "label_components"] = "paired"
    images_dir: str = "images"
    masks_dir: str = "masks"
    #: Name endings stripped before pairing by stem, e.g. mask_suffix: _mask pairs a.png with a_mask.png.
    image_suffix: str = ""
    mask_suffix: str = ""
    split_dirs: SplitDirs = SplitDirs()
    annot_suffix: str = "annot"
    #: null: mask values are class ids; or {raw value: class id}, e.g. {0: 1, 255: 0}.
    mask_values: dict[RawValue, int] | None = None
    #: Colour-coded RGB masks: {class name: [r, g, b]}.
    palette: dict[str, RGB] | None = None
    #: Raw mask values (or [r, g, b] colours with a palette) that mean "no class": ignored in training and scoring.
    ignore_values: list[RawValue | RGB] = []
    #: A regex over the file's id (its path under the images folder, without the extension); the first
    #: group (or the named group ``group``) keeps related images (slices of one volume) in one split.
    group: str | None = None
    #: auto: grayscale data stays one channel, anything else becomes RGB; or force 1 or 3.
    channels: Literal["auto", 1, 3] = "auto"
    #: 16-bit images to 8-bit: full_range maps 0-65535 to 0-255; per_image stretches each image's min-max.
    scale_16bit: Literal["full_range", "per_image"] = "full_range"
    #: Larger images are refused before they are decoded (decompression bombs).
    max_pixels: PositiveInt = 100_000_000
    #: stop: the first bad file fails the stage with its name; skip: leave it out and list it in the report.
    on_bad: Literal["stop", "skip"] = "stop"
    #: Decoding processes; auto = the cores this process may use.
    workers: Literal["auto"] | PositiveInt = "auto"
    #: layout: paired only. {split: [ids]}: these ids go to that split (a fixed hold-out); the rest by the hash.
    split_ids: dict[Split, list[str]] | None = None
    #: layout: paired only. {split: list file}: a text file of ids, one per line, inside the dataset
    #: (e.g. Pascal VOC's ImageSets/Segmentation/train.txt); only listed ids are ingested, split as listed.
    split_lists: dict[Split, str] | None = None
    #: layout: paired (or source: synthetic). A frozen test set: exactly these ids are the test split, and
    #: images added later go to train/val (those the hash would send to test go to train), so test scores
    #: stay comparable as the data grows. ``segflow freeze-test`` writes today's test ids here.
    test_ids: list[str] | None = None
    #: layout: paired only; the split of each id (or group) is a seeded hash cut at these fractions.
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    synthetic: SyntheticParams = SyntheticParams()
    #: layout: coco. The COCO JSON file, relative to ``path`` (e.g. annotations/instances.json).
    annotations: str | None = None
    #: layout: instance_png. {object value (or Cityscapes label id): class name}; null with one class: all of it.
    instance_classes: dict[RawValue, str] | None = None
    #: layout: instance_png. Values are Cityscapes' ``label_id * 1000 + n`` (below 1000: no object).
    cityscapes: bool = False
    #: layout: label_components. The mask value whose connected regions (4-connectivity) are the objects.
    component_value: RawValue | None = None
    #: task: instance. Images without any annotated object: keep (as negatives) or refuse (a problem).
    negatives: Literal["keep", "refuse"] = "keep"
    #: task: instance. An annotated object with fewer visible pixels is a problem (label_components: dropped).
    min_area: PositiveInt = 2

    def instance_layout(self) -> bool:
        """Whether the layout is one of task: instance's."""
        return self.layout in INSTANCE_LAYOUTS

    @field_validator("group")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"not a valid regular expression ({error})") from None
        return value

    @field_validator("images_dir", "masks_dir")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        if not value or Path(value).is_absolute() or ".." in Path(value).parts:
            raise ValueError("must be a folder name inside ingest.path")
        return value

    @model_validator(mode="after")
    def _fractions(self) -> IngestParams:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave some data for training")
        if self.mask_values is not None and self.palette is not None:
            raise ValueError("give either ingest.mask_values (grayscale masks) or ingest.palette (RGB masks), not both")
        if self.palette is None and any(isinstance(v, tuple) for v in self.ignore_values):
            raise ValueError("ingest.ignore_values holds [r, g, b] colours, which need ingest.palette")
        hashed = self.layout == "paired" or self.instance_layout()  # the split is the seeded hash of each id
        for key in ("group", "split_ids", "split_lists"):
            if getattr(self, key) is not None and not (hashed if key != "split_lists" else self.layout == "paired"):
                raise ValueError(f"ingest.{key} applies to layout: paired (split_folders keeps the given split)")
        if self.split_ids is not None and self.split_lists is not None:
            raise ValueError("give either ingest.split_ids or ingest.split_lists, not both")
        if self.test_ids is not None:
            if self.source == "folder" and (not hashed or self.split_lists is not None):
                raise ValueError(
                    "ingest.test_ids freezes a hashed test split (layout: paired); with split_folders or "
                    "split_lists the dataset's own lists already fix it"
                )
            if self.split_ids and "test" in self.split_ids:
                raise ValueError("give the test ids in ingest.test_ids or ingest.split_ids.test, not both")
            if not self.test_ids:
                raise ValueError("ingest.test_ids is empty; list the frozen test ids, or set it to null")
        if self.split_ids is not None:
            listed = [i for ids in self.split_ids.values() for i in ids]
            twice = sorted({i for i in listed if listed.count(i) > 1})
            if twice:
                raise ValueError(f"ingest.split_ids lists {twice} in more than one split")
        return self

    def resolved_workers(self) -> int:
        """The worker count ``auto`` stands for: the cores this process may run on."""
        return self.workers if self.workers != "auto" else available_cores()


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which container limits narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class NormalizeParams(_Section):
    """Per-channel mean and std on the 0-1 scale: one value (any channel count) or one per channel."""

    mean: list[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406], min_length=1)
    std: list[PositiveFloat] = Field(default_factory=lambda: [0.229, 0.224, 0.225], min_length=1)

    @model_validator(mode="after")
    def _lengths(self) -> NormalizeParams:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}; give one pair per channel")
        return self

    def for_channels(self, channels: int, source: str = "the data") -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and std for ``channels`` image channels (a single value is repeated).

        Raises:
            ParamsError: neither one value nor one per channel.
        """
        if len(self.mean) == 1:
            return (self.mean[0],) * channels, (self.std[0],) * channels
        if len(self.mean) != channels:
            hint = "e.g. mean: [0.5], std: [0.25]" if channels == 1 else f"{channels} values each"
            raise ParamsError(
                f"params.yaml: augment.normalize has {len(self.mean)} values per key but {source} has "
                f"{channels} channel{'s' if channels > 1 else ''}; give one value or one per channel ({hint})"
            )
        return tuple(self.mean), tuple(self.std)


#: The augment keys of segflow before recipes, and what replaced each (a one-line hint, not a crash).
_OLD_AUGMENT_KEYS = {
    "hflip": "HorizontalFlip",
    "vflip": "VerticalFlip",
    "rotate90": "RandomRotate90",
    "affine": "Affine",
    "brightness_contrast": "RandomBrightnessContrast",
    "brightness_limit": "RandomBrightnessContrast",
    "contrast_limit": "RandomBrightnessContrast",
    "gauss_noise": "GaussNoise",
    "elastic": "ElasticTransform",
    "grid_distortion": "GridDistortion",
}


class AugmentParams(_Section):
    """The training and evaluation pipelines (albumentations), as recipes: see segflow/recipes.py."""

    #: The training recipe to start from: none | light | default | strong | microscopy | street.
    preset: Literal["none", "light", "default", "strong", "microscopy", "street"] = "default"
    #: Changes to the preset's transforms by name: {Affine: {p: 0.5}}; null removes one: {GaussNoise: null}.
    overrides: dict[str, dict[str, Any] | None] = {}
    #: Transforms appended to the preset's: [{name: CLAHE, p: 0.3}, ...] (any albumentations 2-D transform).
    train: list[dict[str, Any]] = []
    #: Pixel-level transforms applied before normalisation at validation, evaluation and prediction.
    eval: list[dict[str, Any]] = []
    #: Training crop (pixels, square); images are padded first when smaller.
    crop_size: int = Field(96, ge=16)
    #: Eval images are padded so height and width divide by this (the model's stride).
    pad_divisor: int = Field(32, ge=1)
    normalize: NormalizeParams = NormalizeParams()
    preview_samples: int = Field(6, ge=1, le=64)
    #: task: instance. Objects a crop leaves with fewer visible pixels than this are dropped from that sample.
    min_instance_area: PositiveInt = 8

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        old = [key for key in (data if isinstance(data, dict) else ()) if key in _OLD_AUGMENT_KEYS]
        if old:
            key = old[0]
            raise ValueError(
                f"augment.{key} was replaced by recipes: choose augment.preset (default holds the old pipeline) "
                f"and change a transform with augment.overrides, e.g. {{{_OLD_AUGMENT_KEYS[key]}: {{p: 0.5}}}} "
                "(README, Augmentation)"
            )
        return data

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _names_alone(cls, value: Any) -> Any:
        # `- CLAHE` is short for `- {name: CLAHE}` (the transform with its default arguments).
        return [{"name": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _recipes(self) -> AugmentParams:
        for i, step in enumerate(self.train):
            recipes.check_step(step, f"augment.train[{i}]")
        for i, step in enumerate(self.eval):
            recipes.check_step(step, f"augment.eval[{i}]", pixel_only=True)
        steps = self.train_recipe()  # overrides that name nothing in the preset fail here
        for name, change in self.overrides.items():
            if change is not None:
                holder, index = recipes.find_step(steps, name)[0]
                recipes.check_step(holder[index], f"augment.overrides.{name}")
        return self

    def train_recipe(self) -> list[dict[str, Any]]:
        """The training transforms: the preset, overridden, with ``train`` appended (before normalisation)."""
        try:
            return recipes.resolve(self.preset, self.overrides, self.train)
        except ValueError as error:
            raise ValueError(f"augment.{error}") from None


class SharedTrainParams(_Section):
    """What training means in both task families (the optimiser, the schedule, budgets, the engine)."""

    #: null = random init; or a path to a local weights file (.safetensors / .pth) holding encoder (backbone)
    #: or whole-model weights (task: instance: torchvision's). Hub names ("imagenet") need network.
    encoder_weights: str | None = None
    #: adamw | sgd (with ``momentum``, Nesterov).
    optimizer: Literal["adamw", "sgd"] = "adamw"
    #: Peak learning rate (the schedule's top).
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    #: Per optimiser step: onecycle (warm-up then cosine anneal), cosine (linear warm-up over
    #: ``warmup_epochs``, then cosine to 0), poly (DeepLab's (1 - t/T)^0.9), constant.
    schedule: Literal["onecycle", "cosine", "poly", "constant"] = "onecycle"
    warmup_epochs: float = Field(1.0, ge=0.0)
    #: Clip the gradients' global L2 norm to this (0 = off).
    grad_clip: NonNegativeFloat = 0.0
    #: Batches whose gradients are summed per optimiser step (effective batch = batch_size x this).
    # Upper bounds catch a slip of the keyboard (1000000000 epochs) before it trains for years.
    accumulate: int = Field(1, ge=1, le=1024)
    epochs: int = Field(20, ge=1, le=10_000)
    #: Stop cleanly after this many minutes of training (resumed parts counted together), keeping the best
    #: validated weights; null = no limit.
    max_minutes: float | None = Field(None, gt=0, allow_inf_nan=False)
    batch_size: int = Field(16, ge=1, le=4096)
    mode: Literal["auto", "max", "min"] = "auto"
    #: Validate every N epochs, and always after the last; the kept epoch is a validated one.
    val_every: int = Field(1, ge=1, le=10_000)
    #: Early stopping: stop after this many validations (epochs, for train/loss) without an improvement of
    #: ``min_delta`` (0 = off).
    patience: NonNegativeInt = 0
    min_delta: NonNegativeFloat = 0.0
    #: Resume an interrupted run from its last completed epoch (checkpoints in .segflow/checkpoints/,
    #: keyed by params, data and code; see README "Training you can leave running").
    resume: bool = True
    #: DataLoader worker processes (decoding, augmentation). auto: on a GPU, the cores this process may use
    #: less one for the training loop (at most 8 per device); on the CPU, 0 below 8 cores (the model
    #: itself uses every core, and a worker only competes with it), else a quarter of them.
    num_workers: Literal["auto"] | NonNegativeInt = "auto"
    #: Decoded training and validation images are kept in memory when they fit in this many MiB
    #: (decoded once, not every epoch); 0 = decode on every access.
    cache_mb: NonNegativeInt = 2048
    #: torch.compile the model (its compile time is logged); first steps are slower, later ones faster.
    compile: bool = False
    accelerator: Accelerator = "auto"
    #: Devices per node: a count, or auto (every GPU; one process on the CPU). Above 1 needs strategy ddp.
    devices: Literal["auto"] | PositiveInt = 1
    #: ddp: one process per device (Lightning DDP; gloo on CPU, NCCL on CUDA); auto: Lightning's choice
    #: (DDP when there are several devices).
    strategy: Literal["auto", "ddp"] = "auto"
    #: Machines in a multi-node DDP run (launched on each node; README "Several GPUs, several nodes").
    num_nodes: PositiveInt = 1
    precision: Precision = "auto"
    #: Deterministic kernels (torch.use_deterministic_algorithms, no cuDNN autotuning): bit-identical reruns on
    #: the same GPU and software, at some speed. CPU training is deterministic either way.
    deterministic: bool = False
    #: A progress line (step, images/s, running loss, ETAs) at least this often within an epoch, in seconds;
    #: 0 = only the per-epoch lines.
    log_every_s: float = Field(30.0, ge=0, allow_inf_nan=False)

    @field_validator("encoder_weights")
    @classmethod
    def _weights(cls, value: str | None) -> str | None:
        return None if value in (None, "", "none", "null") else value

    def resolved_workers(self, on_gpu: bool, cores: int | None = None, world_size: int = 1) -> int:
        """The DataLoader worker count ``auto`` stands for (see ``num_workers``), per training process.

        Args:
            on_gpu: the model trains on a GPU (the CPU is free for the data path).
            cores: the cores available (default: this process's).
            world_size: training processes on this machine.
        """
        if self.num_workers != "auto":
            return self.num_workers
        cores = available_cores() if cores is None else cores
        # Each DDP process has its own loader: share the cores between them.
        per_process = cores // max(1, world_size)
        if on_gpu:
            return max(0, min(8, per_process - 1))
        return 0 if per_process < 8 else min(8, per_process // 4)

    def resolved_mode(self) -> str:
        """``max`` or ``min``: the direction in which ``monitor`` improves."""
        if self.mode != "auto":
            return self.mode
        return "min" if self.monitor.endswith("loss") else "max"


class TrainParams(SharedTrainParams):
    """task: semantic. A segmentation-models-pytorch (or FCN / SegNet) model and its loss."""

    #: Any smp architecture, or FCN (torchvision's heads; encoder resnet50/resnet101) or SegNet (encoder
    #: vgg16_bn/vgg13_bn/vgg11_bn; max-unpooling with the encoder's indices).
    arch: Arch = "Unet"
    encoder: str = "resnet18"
    encoder_depth: int = Field(5, ge=3, le=5)
    #: Decoder widths, one per encoder stage (Unet-like archs only); null = smp's default.
    decoder_channels: list[int] | None = None
    loss: Loss = "dice_ce"
    #: Class weights for the loss's cross-entropy or focal term (dice and lovasz alone have none): null (none),
    #: median_frequency (SegNet's median frequency balancing, from the training split's pixel counts), or one
    #: positive weight per class, in class order.
    class_weights: Literal["median_frequency"] | list[float] | None = None
    #: The metric that picks the kept epoch and drives early stopping: val/iou_macro, val/dice_macro,
    #: val/loss, or val/iou_<class>; ``mode`` auto = min for losses, max for scores.
    monitor: str = Field("val/iou_macro", pattern=r"^(val/(iou_macro|dice_macro|loss|iou_\w+)|train/loss)$")
    #: channels_last memory format for the model and its inputs (faster convolutions on tensor cores).
    #: auto = on CUDA, and on the CPU with bf16 mixed precision (1.3x faster there); not for fp32 on the CPU.
    channels_last: Literal["auto"] | bool = "auto"

    @field_validator("class_weights", mode="before")
    @classmethod
    def _class_weights(cls, value: Any) -> Any:
        if value is None or value == "median_frequency":
            return value
        if isinstance(value, list | tuple) and value:
            numbers = all(isinstance(w, int | float) and not isinstance(w, bool) for w in value)
            if numbers and all(0 < w < float("inf") for w in value):
                return [float(w) for w in value]
        raise ValueError(f"must be null, median_frequency or a list of positive numbers, one per class (got {value!r})")

    def use_channels_last(self, on_gpu: bool, precision: str = "32-true") -> bool:
        """Whether ``channels_last`` applies (auto: on a GPU, or with bf16 mixed precision on the CPU)."""
        if self.channels_last != "auto":
            return self.channels_last
        return on_gpu or precision.startswith("bf16")

    @model_validator(mode="after")
    def _decoder_depth(self) -> TrainParams:
        if self.decoder_channels is not None and len(self.decoder_channels) != self.encoder_depth:
            raise ValueError(
                f"decoder_channels has {len(self.decoder_channels)} entries but encoder_depth is "
                f"{self.encoder_depth}; give one width per encoder stage"
            )
        return self

    @model_validator(mode="after")
    def _weighted_term(self) -> TrainParams:
        if self.class_weights is not None and self.loss in ("dice", "lovasz"):
            raise ValueError(
                f"train.class_weights weights the cross-entropy or focal term of the loss, and train.loss {self.loss} "
                "has none; use ce, dice_ce, focal or focal_dice, or set class_weights: null"
            )
        return self


#: task: instance. Backbones of torchvision's Mask R-CNN (an FPN on each): resnet50 is
#: ``maskrcnn_resnet50_fpn_v2``; the others are lighter (CPU runs).
MaskBackbone = Literal["resnet18", "resnet34", "resnet50", "mobilenet_v3_large"]


class InstanceTrainParams(SharedTrainParams):
    """task: instance. torchvision's Mask R-CNN; its losses are summed as torchvision returns them."""

    arch: Literal["MaskRCNN"] = "MaskRCNN"
    encoder: MaskBackbone = "resnet18"
    #: The model's own resize (GeneralizedRCNNTransform): images are scaled so their short side is min_size,
    #: long side at most max_size. Both null: no rescaling at all, in training and at inference (torchvision's
    #: 800 px default would upsample a 128-px CPU image six times, and shrink a large one to it).
    min_size: PositiveInt | None = None
    max_size: PositiveInt | None = None
    #: The metric that picks the kept epoch and drives early stopping: COCO mask AP on the validation split
    #: (val/segm_map, val/segm_map_50) or train/loss. Mask R-CNN gives losses only in training mode, so
    #: validation scores, it has no loss.
    monitor: Literal["val/segm_map", "val/segm_map_50", "train/loss"] = "val/segm_map"
    #: Anchors per image the region proposal network keeps after NMS while training / at inference.
    rpn_post_nms_top_n: PositiveInt = 1000
    #: Channels of the FPN and the mask head (the box head's width is 4x this); torchvision's is 256.
    #: Most of a CPU step is the heads: 64 makes small-image runs several times faster. resnet50 (v2) keeps 256.
    width: int = Field(256, ge=16, le=1024)
    #: Region proposals sampled per image to train the box and mask heads (torchvision's 512).
    rois_per_image: int = Field(512, ge=16, le=4096)
    #: The smallest anchor (pixels), doubling per FPN level; null: an eighth of the image size, 8 to 32
    #: (torchvision's 32 suits 800-px images; small cells need less).
    anchor_size: PositiveInt | None = None
    #: Detections kept per image when validating (mask AP over the validation split; masks above 0.5).
    #: Evaluate and predict keep ``predict.max_detections``.
    val_detections: int = Field(100, ge=1, le=10_000)

    @model_validator(mode="after")
    def _v2_width(self) -> InstanceTrainParams:
        if self.encoder == "resnet50" and self.width != 256:
            raise ValueError(
                "train.width: resnet50 is torchvision's maskrcnn_resnet50_fpn_v2, whose FPN and heads are 256 wide; "
                "use width: 256 or a lighter encoder (resnet18, resnet34, mobilenet_v3_large)"
            )
        return self


class EvaluateParams(_Section):
    #: How many test images the predictions preview shows.
    preview_samples: int = Field(6, ge=1, le=64)


class PredictParams(_Section):
    """Inference, for ``evaluate`` and ``segflow predict`` alike (so what is scored is what ships)."""

    #: Images larger than this (either side) are predicted in overlapping tiles of this size; memory is
    #: bounded by the tile, not the image. A multiple of the model's stride (augment.pad_divisor).
    tile_size: int = Field(512, ge=32)
    #: Pixels neighbouring tiles share. Each pixel is taken from the tile it lies most centrally in
    #: (a short linear crossover in the middle of the overlap), so a tile counts only from about
    #: 3/8 * overlap off its inner edges: a model whose padding effects reach less than that gives
    #: exactly the whole-image result.
    overlap: int = Field(128, ge=0)
    #: Tiles (or images) per forward pass.
    batch_size: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _sizes(self) -> PredictParams:
        if self.overlap >= self.tile_size:
            raise ValueError(
                f"predict.overlap ({self.overlap}) must be smaller than predict.tile_size ({self.tile_size})"
            )
        return self


class InstanceEvaluateParams(EvaluateParams):
    """task: instance. COCO mask and box AP; object counts; pixel IoU/Dice from the instance masks."""

    #: Predictions scoring at least this count as objects (counts, the semantic IoU/Dice, the pictures);
    #: AP ranks every kept prediction whatever its score.
    count_threshold: float = Field(0.5, ge=0.0, le=1.0)


class InstancePredictParams(PredictParams):
    """task: instance. Inference, for evaluate and ``segflow predict`` alike."""

    #: Detections scoring below this are dropped (COCO AP is computed over what is kept).
    score_threshold: float = Field(0.05, ge=0.0, lt=1.0)
    #: A detection's mask is its soft mask above this.
    mask_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    #: Detections kept per image (and COCO's maxDets): raise it for crowded images (hundreds of cells).
    max_detections: int = Field(100, ge=1, le=10_000)
    #: Tiles overlapping by ``overlap``: an object found in two tiles is kept once when its masks
    #: overlap by at least this IoU.
    merge_iou: float = Field(0.5, gt=0.0, le=1.0)


class RegisterParams(_Section):
    """Model registration (``segflow register``, the flow's register task): GTO versions and stages."""

    #: The artifact name in dvc.yaml ``artifacts:`` and in the GTO tags (``<model>@v1.2.3``, ``<model>#prod#N``).
    model: str = Field("segflow-model", pattern=r"^[a-zA-Z0-9]([a-zA-Z0-9_/-]*[a-zA-Z0-9])?$")
    #: The test metric of the champion/challenger gate, as ``<group>.<key>`` of evaluate's metrics.json.
    metric: str = Field("iou.macro", pattern=r"^[\w]+(\.[\w]+)+$")
    direction: Literal["max", "min"] = "max"
    #: A challenger is promoted to ``prod`` only when better than the champion by at least this much.
    min_improvement: NonNegativeFloat = 0.005
    stage: str = "prod"
    bump: Literal["patch", "minor", "major"] = "patch"
    #: Commit dvc.lock, params.yaml and the git-tracked metrics before registering (what scheduled
    #: retraining does); false: refuse while they hold uncommitted changes.
    commit: bool = False
    #: Score the champion again on the candidate's test split when the split has changed since the champion
    #: was registered (added, removed or relabelled images), so the gate compares like with like; cached per
    #: (version, split). false: compare with the champion's score on its own split (a frozen test set).
    rescore: bool = True
    #: Push the registration commit and its tags to the git remote ``origin`` (after ``dvc push``), so the
    #: other clones see the version after ``git fetch --tags``: auto pushes when there is an origin.
    push: Literal["auto"] | bool = "auto"

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "export" in data:
            raise ValueError(
                "register.export moved to export.formats (its own stage after train: switching an export on or "
                f"off retrains nothing); write `export: {{formats: {data['export']}}}` at the top level"
            )
        return data


class ExportParams(_Section):
    """Stage ``export``: the trained model in other formats, each checked against PyTorch (no retraining)."""

    #: Formats written to ``${paths.export}`` beside a copy of the model card: onnx (onnxruntime runs it).
    formats: list[Literal["onnx"]] = []


class ScheduleParams(_Section):
    """Scheduled retraining (``segflow deploy``): when, and on which Prefect work pool. Not a stage."""

    #: Cron expression of the deployment's schedule (default: nightly at 02:00).
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    work_pool: str = Field("segflow", min_length=1)

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if len(value.split()) not in (5, 6):
            raise ValueError("must be a cron expression of 5 fields, e.g. '0 2 * * *' (02:00 every day)")
        return value


# A section named `register` shadows BaseModel's inherited ABC `register` (harmless: nothing calls it on
# Params); pydantic warns about it when the class is made.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register" in "Params" shadows', category=UserWarning)

    class Params(_Section):
        """The whole params.yaml."""

        #: semantic: one class per pixel (smp, FCN, SegNet); instance: the objects themselves (Mask R-CNN).
        task: Literal["semantic", "instance"] = "semantic"
        seed: int = 42
        classes: list[str] = Field(default_factory=lambda: ["background", "disk", "box", "triangle"])
        #: The class that is not an object (left out of ``macro_foreground``), by name; null: none is.
        background: str | None = None
        paths: Paths = Paths()
        ingest: IngestParams = IngestParams()
        augment: AugmentParams = AugmentParams()
        train: TrainParams = TrainParams()
        export: ExportParams = ExportParams()
        evaluate: EvaluateParams = EvaluateParams()
        predict: PredictParams = PredictParams()
        register: RegisterParams = RegisterParams()
        schedule: ScheduleParams = ScheduleParams()

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
        def _background_named(self) -> Params:
            if self.background is not None and self.background not in self.classes:
                raise ValueError(
                    f"background: {self.background!r} is not one of classes {self.classes}; name the class that "
                    "is not an object, or write background: null"
                )
            weights = self.train.class_weights
            if isinstance(weights, list) and len(weights) != len(self.classes):
                raise ValueError(
                    f"train.class_weights has {len(weights)} weights for {len(self.classes)} classes "
                    f"{self.classes}; give one per class, in class order"
                )
            return self

        @model_validator(mode="after")
        def _consistent(self) -> Params:
            ingest, num_classes = self.ingest, len(self.classes)
            _keys_of_other_task(self)
            if ingest.source == "folder" and ingest.instance_layout():
                raise ValueError(
                    f"ingest.layout: {ingest.layout} holds object instances; set task: instance to train Mask R-CNN "
                    "on it, or use layout paired / split_folders for class masks"
                )
            weights = ingest.synthetic.class_weights
            # The synthetic section only matters while it is the source (it stays in params.yaml for the demo).
            if ingest.source == "synthetic" and weights is not None and len(weights) != num_classes - 1:
                raise ValueError(
                    f"ingest.synthetic.class_weights has {len(weights)} entries; "
                    f"give one per object class ({num_classes - 1}: {self.classes[1:]})"
                )
            if ingest.source == "synthetic" and num_classes - 1 > SYNTHETIC_OBJECT_CLASSES:
                raise ValueError(
                    f"classes: the synthetic source draws at most {SYNTHETIC_OBJECT_CLASSES} object classes, "
                    f"got {num_classes - 1}; list at most {SYNTHETIC_OBJECT_CLASSES + 1} classes"
                )
            for raw, cls in (ingest.mask_values or {}).items():
                if not 0 <= cls < num_classes:
                    raise ValueError(
                        f"ingest.mask_values maps {raw} to class id {cls}, but classes has ids 0-{num_classes - 1}; "
                        "list the value under ingest.ignore_values to ignore it"
                    )
            if ingest.palette is not None:
                unknown = [name for name in ingest.palette if name not in self.classes]
                if unknown:
                    raise ValueError(f"ingest.palette names {unknown}, which are not in classes {self.classes}")
                colours = list(ingest.palette.values())
                if len(set(colours)) != len(colours):
                    raise ValueError("ingest.palette gives two classes the same colour")
            if self.predict.tile_size % self.augment.pad_divisor:
                raise ValueError(
                    f"predict.tile_size is {self.predict.tile_size}, not a multiple of augment.pad_divisor "
                    f"({self.augment.pad_divisor}); use a multiple of it"
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


#: Keys of one task family that mean nothing in the other: refused by name when set.
_SEMANTIC_ONLY = {
    "ingest": (
        "split_dirs",
        "annot_suffix",
        "mask_values",
        "palette",
        "ignore_values",
        "split_lists",
    ),
}
_INSTANCE_ONLY = {
    "ingest": ("annotations", "instance_classes", "cityscapes", "component_value", "negatives", "min_area"),
    "augment": ("min_instance_area",),
}


def _keys_of_other_task(params: Params) -> None:
    """Refuse keys of the other task family set to other than their defaults, naming the first."""
    other = _INSTANCE_ONLY if params.task == "semantic" else _SEMANTIC_ONLY
    for section, keys in other.items():
        values = getattr(params, section)
        for key in keys:
            # params.yaml lists every key with its default: only a value that means something is refused.
            if key in values.model_fields_set and getattr(values, key) != type(values).model_fields[key].default:
                raise ValueError(
                    f"{section}.{key} does not apply to task: {params.task} "
                    f"(it is a task: {'instance' if params.task == 'semantic' else 'semantic'} key); remove it"
                )


class InstanceParams(Params):
    """The whole params.yaml for ``task: instance``: Mask R-CNN's sections where the families differ."""

    #: The object categories (COCO category names); background is implicit, not listed.
    classes: list[str] = Field(default_factory=lambda: ["disk", "box", "triangle"])
    train: InstanceTrainParams = InstanceTrainParams()
    evaluate: InstanceEvaluateParams = InstanceEvaluateParams()
    predict: InstancePredictParams = InstancePredictParams()

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("task: instance needs at least one object category (background is implicit)")
        if len(set(value)) != len(value):
            raise ValueError(f"class names repeat: {value}")
        if len(value) > 1000:
            raise ValueError("at most 1000 object categories")
        return value

    @model_validator(mode="after")
    def _background_named(self) -> InstanceParams:
        if self.background is not None:
            raise ValueError(
                "background: task: instance has no background class (classes lists the objects; what is not an "
                "object is background); write background: null"
            )
        return self

    @model_validator(mode="after")
    def _consistent(self) -> InstanceParams:
        ingest = self.ingest
        _keys_of_other_task(self)
        if ingest.source == "folder" and not ingest.instance_layout():
            raise ValueError(
                f"ingest.layout: {ingest.layout} holds class masks, not objects; with task: instance use one of "
                f"{', '.join(INSTANCE_LAYOUTS)} (docs/datasets.md, Instance segmentation)"
            )
        if ingest.source == "synthetic" and len(self.classes) > SYNTHETIC_OBJECT_CLASSES:
            raise ValueError(
                f"classes: the synthetic source draws at most {SYNTHETIC_OBJECT_CLASSES} object classes, "
                f"got {len(self.classes)}"
            )
        weights = ingest.synthetic.class_weights
        if ingest.source == "synthetic" and weights is not None and len(weights) != len(self.classes):
            raise ValueError(
                f"ingest.synthetic.class_weights has {len(weights)} entries; give one per object class "
                f"({len(self.classes)}: {self.classes})"
            )
        if ingest.layout == "coco" and not ingest.annotations:
            raise ValueError("ingest.annotations: layout coco needs the COCO JSON file, e.g. annotations.json")
        if ingest.layout == "label_components" and ingest.component_value is None:
            raise ValueError("ingest.component_value: layout label_components needs the mask value of the objects")
        if self.export.formats:
            raise ValueError(
                "export.formats: segflow exports no Mask R-CNN to ONNX yet (torchvision's detection models export "
                "only at one fixed input size, and their post-processing with it); write export: {formats: []}"
            )
        if self.predict.tile_size % 32:
            raise ValueError(f"predict.tile_size is {self.predict.tile_size}, not a multiple of 32 (the FPN stride)")
        return self


def params_class(data: object) -> type[Params]:
    """The params model of the task a parsed params.yaml names (``task``, default semantic)."""
    return InstanceParams if isinstance(data, dict) and data.get("task") == "instance" else Params


def _describe(error: ValidationError, source: Path) -> str:
    """One line per problem, each naming the key, e.g. ``train.lr: ...``."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: {_unknown_key(key, item['loc'])}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        # Cross-key checks see a whole section as their input: their message names the keys.
        got = "" if isinstance(value, dict) or item["type"] == "value_error" else f" (got {value!r})"
        # A message that already names its key (recipe checks: augment.train[2]: ...) is not prefixed again.
        prefix = f"{key}: " if key and not message.startswith(key) else ""
        lines.append(f"{source}: {prefix}{message}{got}")
    return "; ".join(lines)


def _unknown_key(key: str, loc: tuple) -> str:
    """The message for a key no section has: another task family's key is named as such."""
    if len(loc) == 2 and loc[0] in ("train", "evaluate", "predict"):
        section, name = loc
        semantic = Params.model_fields[section].annotation.model_fields
        instance = InstanceParams.model_fields[section].annotation.model_fields
        if name in semantic and name not in instance:
            return (
                f"{key} does not apply to task: instance (Mask R-CNN); remove it (`segflow params FILE` with "
                "task: instance in FILE removes such keys for you)"
            )
        if name in instance and name not in semantic:
            return f"{key} is a task: instance key; remove it, or set task: instance"
    return f"unknown key '{key}' (misspelt? remove it or fix the name)"


def parse_params(data: dict | None, source: Path | str = PARAMS_FILE) -> Params:
    """Validate an already-parsed params mapping, with the sections of the task it names.

    Raises:
        ParamsError: one line naming every bad key.
    """
    try:
        return params_class(data).model_validate(data or {})
    except ValidationError as error:
        raise ParamsError(_describe(error, Path(source))) from None


#: Most values a YAML document may expand to (aliases counted each time they are used): params files hold
#: hundreds; an "alias bomb" of a few lines expands to billions and would hang whatever parses it.
YAML_BUDGET = 100_000


def _expanded(node, budget: int, seen: dict[int, int]) -> int:
    """How many nodes ``node`` expands to (aliases followed), stopping once past ``budget``."""
    if id(node) in seen:
        return seen[id(node)]
    total = 1
    for child in node.value if isinstance(node.value, list) else []:
        for part in child if isinstance(child, tuple) else (child,):
            total += _expanded(part, budget, seen)
        if total > budget:
            break
    seen[id(node)] = total
    return total


def read_yaml(text: str, source: Path | str) -> object:
    """Parse YAML a person edits: one-line errors with line and column, and aliases bounded.

    Raises:
        ParamsError: not valid YAML, or aliases that expand beyond :data:`YAML_BUDGET` values.
    """
    # Not libyaml's CSafeLoader: its error positions and messages are worse.
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()  # aliases stay references here: composing is linear in the text
        if node is None:
            return None
        if _expanded(node, YAML_BUDGET, {}) > YAML_BUDGET:
            raise ParamsError(
                f"{source}: its YAML aliases (*name) expand to more than {YAML_BUDGET} values; write the values "
                "out instead of nesting anchors (&name)"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else str(source)
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        raise ParamsError(
            f"{where}: not valid YAML ({problem}); check the indentation, colons and quotes there"
        ) from None
    finally:
        loader.dispose()


#: Validated params by (file, its text): one run reads params.yaml in several places.
_LOADED: dict[tuple[str, str], Params] = {}


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; stage outputs (``paths``) must stay inside the project (its folder).

    Raises:
        ParamsError: the file is missing, is not YAML, or holds a bad key or value.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(
            f"{path.absolute()}: not found; segflow reads params.yaml from the project root (the folder holding "
            "dvc.yaml): run from there, or restore the file (git checkout -- params.yaml)"
        ) from None
    except UnicodeDecodeError:
        raise ParamsError(f"{path}: not a text file (UTF-8 YAML); restore it (git checkout -- {path.name})") from None
    key = (str(path.absolute()), text)
    if key not in _LOADED:
        data = read_yaml(text, path)
        if data is not None and not isinstance(data, dict):
            raise ParamsError(f"{path}: must be a mapping of sections, got {type(data).__name__}")
        params = parse_params(data, path)
        _LOADED.clear()  # one file's current text is all a process needs
        _LOADED[key] = params
    params = _LOADED[key].model_copy(deep=True)  # callers may change their copy
    # Checked every time: the paths are resolved against the file system (links can change).
    check_paths(params, path.absolute().parent, path)
    return params


def check_paths(params: Params, root: Path, source: Path | str = PARAMS_FILE) -> None:
    """Every ``paths.*`` must resolve inside ``root`` (links followed): stages write nowhere else.

    Raises:
        ParamsError: a path that is absolute outside the project, climbs out with ``..``, or leads out
            through a symbolic link.
    """
    root = Path(root).resolve()
    for key, value in params.paths.model_dump().items():
        target = (root / value).resolve()
        if target == root or not target.is_relative_to(root):
            raise ParamsError(
                f"{source}: paths.{key}: {value} is outside the project ({root}); stage outputs stay inside it, "
                f"e.g. paths.{key}: data/{key}"
            )
