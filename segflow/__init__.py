"""segflow's Python API: registered segmentation models, for services that embed them.

    from segflow import load_model, predict
    model = load_model("segflow-model#prod")          # or "segflow-model@v0.1.2", or a model folder
    mask = predict(model, image)                       # (H, W[, C]) uint8 -> (H, W) uint8 class ids
    logits = model.logits(image)                       # (K, H, W) float32

Models are resolved through the project's GTO registry and fetched by DVC;
weights load from safetensors (never unpickled) after a sha256 check against
the model card. Images of any size: large ones are predicted in blended tiles.
"""

from __future__ import annotations

import numpy as np

from flows.models import load_model

__all__ = ["load_model", "predict"]


def predict(model, image: np.ndarray) -> np.ndarray:
    """Class ids of one image with a model from :func:`load_model`.

    Args:
        image: (H, W) or (H, W, C) uint8 (grayscale, RGB or RGBA).

    Returns:
        (H, W) uint8 class ids (positions in the model card's classes).
    """
    return model.predict(np.asarray(image))
