"""The card of a saved Mask R-CNN and the folder it lives in (the same files as a semantic model's).

``model.safetensors`` (weights, no pickle), ``model.json`` (this card, ``task: instance``) and
``preprocess.json`` (the evaluation pipeline). Loading checks the weights against the card's sha256.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from segflow.errors import SegflowError
from segflow.io import atomic_dir, sha256_file
from segflow.params import MaskBackbone

if TYPE_CHECKING:  # torch takes seconds to import: the export stage reads cards without it
    import torch

WEIGHTS = "model.safetensors"
CARD = "model.json"
PREPROCESS = "preprocess.json"


class InstanceCard(BaseModel):
    """What a saved instance model is and how to feed it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["segflow-model/1"] = "segflow-model/1"
    task: Literal["instance"] = "instance"
    arch: Literal["MaskRCNN"] = "MaskRCNN"
    encoder: MaskBackbone
    in_channels: int = 3
    #: The object categories (background implicit), and the id each has in predict's COCO results JSON.
    classes: list[str]
    category_ids: list[int]
    mean: list[float]
    std: list[float]
    pixel_transforms: list[dict] = []
    pad_divisor: int = 32
    train_size: int
    #: The model's own resize (train.min_size / max_size); None: none (images are seen at their own scale).
    min_size: int | None = None
    max_size: int | None = None
    #: FPN and mask-head channels (train.width).
    width: int = 256
    #: The smallest anchor (train.anchor_size); None: from the image size.
    anchor_size: int | None = None
    weights: str = WEIGHTS
    weights_sha256: str | None = None
    preprocess: str = PREPROCESS
    training: dict = {}
    exports: dict = {}


def is_instance_card(model_dir: Path) -> bool:
    """Whether the model folder holds an instance model (its card says ``task: instance``)."""
    try:
        return json.loads((Path(model_dir) / CARD).read_text(encoding="utf-8")).get("task") == "instance"
    except (OSError, ValueError, AttributeError):
        return False


def read_card(model_dir: Path) -> InstanceCard:
    path = Path(model_dir) / CARD
    if not path.is_file():
        raise SegflowError(f"{path}: not found; train a model first (dvc repro train)")
    try:
        return InstanceCard.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError) as error:
        raise SegflowError(f"{path}: not an instance model card ({' '.join(str(error).split())[:300]})") from None


def save(model: torch.nn.Module, card: InstanceCard, preprocess: Path, out: Path) -> InstanceCard:
    """Write weights, card and preprocessing into ``out`` atomically; returns the card with the weights' hash."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(out) as tmp:
        save_file(state, tmp / card.weights, metadata={"format": "pt"})
        card = card.model_copy(update={"weights_sha256": sha256_file(tmp / card.weights)})
        shutil.copyfile(preprocess, tmp / card.preprocess)
        (tmp / CARD).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return card


def load(model_dir: Path, detections: int = 100, score_threshold: float = 0.05) -> tuple[torch.nn.Module, InstanceCard]:
    """Rebuild a saved instance model with its verified weights, in eval mode on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from segflow.instance.model import build

    card = read_card(model_dir)
    weights = Path(model_dir) / card.weights
    if not weights.is_file():
        raise SegflowError(f"{weights}: not found; fetch the model again")
    if card.weights_sha256 is not None and sha256_file(weights) != card.weights_sha256:
        raise SegflowError(
            f"{weights}: its sha256 does not match {Path(model_dir) / CARD} (the file was changed after training); "
            f"refusing to load it: dvc checkout {model_dir} puts back a pipeline's model"
        )
    model = build(
        card.encoder,
        len(card.classes),
        card.train_size,
        min_size=card.min_size,
        max_size=card.max_size,
        mean=[0.0] * 3,
        std=[1.0] * 3,
        detections=detections,
        score_threshold=score_threshold,
        width=card.width,
        anchor_size=card.anchor_size,
    )
    try:
        model.load_state_dict(load_file(weights), strict=True)
    except (OSError, SafetensorError, RuntimeError) as error:
        raise SegflowError(
            f"{weights}: does not match {Path(model_dir) / CARD} ({str(error)[:300]}); retrain"
        ) from None
    return model.eval(), card
