"""Stage ``export`` for ``task: instance``: the weight-less model folder beside the model (card and preprocessing).

No format is exported yet (params refuse ``export.formats`` for Mask R-CNN: torchvision's detection models
export to ONNX only at one fixed input size, post-processing included); the folder still ties itself to
the weights it describes (their sha256 is checked and kept in the card), as the semantic export's does.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from segflow.errors import SegflowError
from segflow.instance.card import CARD, read_card
from segflow.io import atomic_dir, sha256_file
from segflow.layout import MODEL_DIR
from segflow.params import InstanceParams, Paths

log = logging.getLogger(__name__)


def run(params: InstanceParams, paths: Paths) -> dict:
    """Copy the card and preprocessing of ``${paths.train}/model`` into ``${paths.export}``."""
    model_dir = paths.train / MODEL_DIR
    card = read_card(model_dir)
    if sha256_file(Path(model_dir) / card.weights) != card.weights_sha256:
        raise SegflowError(
            f"{Path(model_dir) / card.weights}: its sha256 does not match {Path(model_dir) / CARD}; "
            f"dvc checkout {model_dir} puts back the pipeline's model"
        )
    with atomic_dir(paths.export) as tmp:
        shutil.copyfile(Path(model_dir) / card.preprocess, tmp / card.preprocess)
        (tmp / CARD).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
    log.info(
        "task: instance: no export formats (ONNX export of Mask R-CNN is not supported); %s holds the card",
        paths.export,
    )
    return {}
