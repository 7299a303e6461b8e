"""Stage ``export``: the trained model in other formats, each checked against PyTorch before it is kept.

Its own DVC stage after ``train`` (params ``export.formats``), so switching a format on or off
reruns this stage only, never training. ``${paths.export}/`` is a model folder without weights:
the exports (``model.onnx``), a copy of the model card with their hashes in ``exports`` (and the
source weights' sha256, which ties the folder to the model it was made from) and the preprocessing.
``segflow predict --backend onnx`` loads it; registration records its hashes in the registry card.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from segflow.errors import SegflowError
from segflow.io import atomic_dir, sha256_file
from segflow.semantic.card import CARD, read_card, write_card

if TYPE_CHECKING:
    import torch

    from segflow.params import Params, Paths
    from segflow.semantic.card import ModelCard

log = logging.getLogger(__name__)

#: Largest absolute logit difference an export may show against PyTorch on the check inputs.
TOLERANCE = 1e-3
ONNX_FILE = "model.onnx"


def export(name: str, model: torch.nn.Module, card: ModelCard, folder: Path) -> dict:
    """Write ``model`` in format ``name`` into ``folder`` and check it on random inputs of several shapes.

    Returns:
        The card's entry: file, sha256, opset and the largest absolute logit difference seen.

    Raises:
        SegflowError: an unknown format, a missing runtime, or logits off by more than :data:`TOLERANCE`.
    """
    import numpy as np
    import torch

    if name != "onnx":
        raise SegflowError(f"export.formats: unknown format {name!r}; formats: onnx")
    try:
        import onnxruntime
    except ImportError:
        raise SegflowError(
            "export.formats: onnx needs the onnx extra; pip install -e '.[onnx]' (onnx, onnxruntime)"
        ) from None
    model = model.cpu().eval()
    size = card.train_size
    sample = torch.randn(1, card.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        # The TorchScript exporter is the one that needs no onnxscript; torch warns that it is the old one.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (sample,),
            str(folder / ONNX_FILE),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={
                "image": {0: "batch", 2: "height", 3: "width"},
                "logits": {0: "batch", 2: "height", 3: "width"},
            },
            opset_version=17,
        )
    session = onnxruntime.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    worst = 0.0
    generator = torch.Generator().manual_seed(1)
    d = card.pad_divisor
    for shape in ((1, size, size), (2, size, 2 * size), (1, 3 * d, 5 * d)):  # several batch sizes and shapes
        batch = torch.randn(shape[0], card.in_channels, shape[1], shape[2], generator=generator)
        with torch.inference_mode():
            expected = model(batch).numpy()
        got = session.run(None, {"image": batch.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > TOLERANCE:
        raise SegflowError(
            f"export.formats: the ONNX model's logits differ from PyTorch's by up to {worst:.2e} (limit "
            f"{TOLERANCE:g}); this architecture does not export faithfully, remove onnx from export.formats"
        )
    return {"file": ONNX_FILE, "sha256": sha256_file(folder / ONNX_FILE), "opset": 17, "max_abs_logit_diff": worst}


def write(model_dir: Path, out: Path, formats: list[str] | tuple[str, ...]) -> ModelCard:
    """Export the saved model in ``model_dir`` into the folder ``out`` (atomically: all or nothing).

    Returns:
        The card written to ``out``: the model's own, with ``exports`` filled in.
    """
    if formats:
        from segflow.semantic import store  # torch: seconds to import, only when there is something to export

        model, card = store.load(model_dir)
    else:  # nothing to export: the card and its weights' check are all there is (no torch)
        model, card = None, read_card(model_dir)
        if sha256_file(Path(model_dir) / card.weights) != card.weights_sha256:
            raise SegflowError(
                f"{Path(model_dir) / card.weights}: its sha256 does not match {Path(model_dir) / CARD}; "
                f"dvc checkout {model_dir} puts back the pipeline's model"
            )
    with atomic_dir(out) as tmp:
        exports = {name: export(name, model, card, tmp) for name in formats}
        card = card.model_copy(update={"exports": exports})
        shutil.copyfile(Path(model_dir) / card.preprocess, tmp / card.preprocess)
        write_card(tmp, card)
    return card


def run(params: Params, paths: Paths) -> dict:
    """The export stage: ``export.formats`` of ``${paths.train}/model`` into ``${paths.export}``."""
    from segflow.layout import MODEL_DIR

    card = write(paths.train / MODEL_DIR, paths.export, params.export.formats)
    for name, entry in card.exports.items():
        log.info("%s: %s, largest logit difference from PyTorch %.2e", name, entry["file"], entry["max_abs_logit_diff"])
    if not card.exports:
        log.info("no export formats asked (export.formats: []); %s holds the card only", paths.export)
    return card.exports
