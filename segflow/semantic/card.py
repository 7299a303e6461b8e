"""The model card: everything needed to rebuild and use a saved model, and its file names.

A saved model is a folder: ``model.safetensors`` (weights, no pickle),
``model.json`` (the card) and ``preprocess.json`` (the evaluation pipeline,
saved with ``A.save``). :mod:`segflow.semantic.store` writes and reads it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from segflow.errors import SegflowError
from segflow.params import IGNORE_INDEX, Arch

log = logging.getLogger(__name__)
WEIGHTS = "model.safetensors"
CARD = "model.json"
PREPROCESS = "preprocess.json"
CARD_FORMAT = "segflow-model/1"


class ModelCard(BaseModel):
    """What a saved model is and how to feed it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["segflow-model/1"] = CARD_FORMAT
    arch: Arch
    encoder: str
    encoder_depth: int
    decoder_channels: list[int] | None = None
    #: 1 (grayscale) or 3 (RGB), as the training data had.
    in_channels: int = 3
    classes: list[str]
    #: Images are uint8 with ``in_channels`` channels, scaled to 0-1, then normalised with mean/std (per channel).
    mean: list[float]
    std: list[float]
    #: augment.eval: pixel-level albumentations transforms (recipe steps) applied before normalisation.
    pixel_transforms: list[dict] = []
    #: Height and width must divide by this; pad (bottom/right) first, crop predictions back.
    pad_divisor: int
    #: The square crop size training saw.
    train_size: int
    ignore_index: int = IGNORE_INDEX
    weights: str = WEIGHTS
    #: sha256 of the weights file: loading refuses a file that was changed after training.
    weights_sha256: str | None = None
    preprocess: str = PREPROCESS
    #: Provenance: seed, epochs, best epoch and its validation score, ...; when set, ``val_every``, the
    #: ``class_weights`` used ({"method", "weights": {class: weight}}), and what ended training early
    #: (``stopped_by``: patience | max_minutes, with ``train_minutes`` and ``stopped_at`` {epoch, step, steps}).
    training: dict = {}
    #: Exports written beside the weights, e.g. {"onnx": {"file", "sha256", "opset", "max_abs_logit_diff"}}.
    exports: dict = {}


def read_card(model_dir: Path) -> ModelCard:
    """Read and check ``model.json``.

    Raises:
        SegflowError: missing or not a segflow model card.
    """
    path = Path(model_dir) / CARD
    if not path.is_file():
        raise SegflowError(f"{path}: not found; train a model first (dvc repro train)")
    try:
        return ModelCard.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError) as error:
        detail = " ".join(str(error).split())
        raise SegflowError(f"{path}: not a {CARD_FORMAT} card ({detail})") from None


def write_card(folder: Path, card: ModelCard) -> None:
    """Write ``card`` as the folder's ``model.json``."""
    (Path(folder) / CARD).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
