"""Save and load a model folder: weights (safetensors, sha256 in the card), card, preprocessing.

Writes are atomic (all or nothing); loads check every file against the card before use, and
never unpickle.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from segflow.errors import SegflowError
from segflow.io import atomic_dir, sha256_file
from segflow.semantic.card import CARD, ModelCard, read_card, write_card
from segflow.semantic.factory import create

log = logging.getLogger(__name__)


def save(model: torch.nn.Module, card: ModelCard, preprocess: Path, out: Path) -> ModelCard:
    """Write weights, card and preprocessing into ``out`` atomically (all or nothing).

    Other formats (ONNX) are the export stage's (:mod:`segflow.semantic.export`).

    Returns:
        The card as written (with the weights' hash).
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(out) as tmp:
        # One metadata key only: safetensors writes several in a random order, which
        # would give the same weights a new hash (and DVC a new output) on every run.
        save_file(state, tmp / card.weights, metadata={"format": "pt"})
        card = card.model_copy(update={"weights_sha256": sha256_file(tmp / card.weights)})
        shutil.copyfile(preprocess, tmp / card.preprocess)
        write_card(tmp, card)
    return card


def verify(model_dir: Path, card: ModelCard, name: str | None = None) -> Path:
    """The path of the weights (or of export ``name``), checked against the card's sha256.

    Raises:
        SegflowError: the file is missing or was changed after training.
    """
    model_dir = Path(model_dir)
    if name is None:
        path, expected = model_dir / card.weights, card.weights_sha256
    elif name in card.exports:
        path, expected = model_dir / card.exports[name]["file"], card.exports[name]["sha256"]
    else:
        raise SegflowError(
            f"{model_dir / CARD}: this model has no {name} export; add {name} to export.formats in params.yaml "
            "and rerun the pipeline (only the export stage runs)"
        )
    if not path.is_file():
        raise SegflowError(f"{path}: not found; fetch the model again")
    if expected is not None and sha256_file(path) != expected:
        raise SegflowError(
            f"{path}: its sha256 does not match {model_dir / CARD} (the file was changed after training); "
            f"refusing to load it: dvc checkout {model_dir} puts back a pipeline's model, and segflow predict "
            "--model NAME@VERSION fetches a registered one"
        )
    return path


def load(model_dir: Path) -> tuple[torch.nn.Module, ModelCard]:
    """Rebuild a saved model with its verified weights, in eval mode on the CPU (no unpickling anywhere)."""
    card = read_card(model_dir)
    weights = verify(model_dir, card)
    model = create(
        card.arch,
        card.encoder,
        card.encoder_depth,
        card.decoder_channels,
        len(card.classes),
        in_channels=card.in_channels,
    )
    try:
        model.load_state_dict(load_file(weights), strict=True)
    except (OSError, SafetensorError, RuntimeError) as error:
        detail = " ".join(str(error).split())[:300]
        raise SegflowError(f"{weights}: does not match {Path(model_dir) / CARD} ({detail}); retrain") from None
    return model.eval(), card
