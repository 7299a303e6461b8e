"""segflow's Python API: registered segmentation models, for services that embed them.

    from segflow import load_model, predict
    model = load_model("segflow-model#prod")          # or "segflow-model@v0.1.2", or a model folder
    mask = predict(model, image)                       # (H, W[, C]) uint8 -> (H, W) uint8 class ids
    logits = model.logits(image)                       # (K, H, W) float32

Models are resolved through the project's GTO registry and fetched by DVC;
weights load from safetensors (never unpickled) after a sha256 check against
the model card. Images of any size: large ones are predicted in blended tiles.

Importing this package is cheap (no torch, DVC or Prefect): ``load_model`` is
looked up on first use, and the stages import only the modules they run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from segflow.registry.fetch import load_model

__all__ = ["load_model", "predict"]


def __getattr__(name: str) -> Any:
    # Lazy: the registry and the model code import torch and DVC, seconds that `import segflow` should not cost.
    if name == "load_model":
        from segflow.registry.fetch import load_model

        return load_model
    raise AttributeError(f"module 'segflow' has no attribute {name!r}")


def predict(model, image):
    """Class ids of one image with a model from :func:`load_model`.

    Args:
        image: (H, W) or (H, W, C) uint8 (grayscale, RGB or RGBA).

    Returns:
        (H, W) uint8 class ids (positions in the model card's classes).
    """
    import numpy as np

    return model.predict(np.asarray(image))
