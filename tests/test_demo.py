"""The demo bar: with the project's own params.yaml the model learns the synthetic scenes.

Slow (the full demo training, a few minutes on 2 cores): ``make test-all`` or
``pytest -m slow``. ``make demo`` shows the same numbers through the flow.
"""

from __future__ import annotations

import pytest

from segflow import augment
from segflow.data import ingest
from segflow.params import load_params
from segflow.semantic import evaluate, train
from tests.conftest import ROOT


@pytest.mark.slow
def test_demo_params_reach_macro_iou_070_on_the_test_split(tmp_path):
    params = load_params(ROOT / "params.yaml")
    paths = params.paths.under(tmp_path)
    for stage in (ingest, augment, train):
        stage.run(params, paths)
    metrics = evaluate.run(params, paths)
    assert metrics["iou"]["macro"] >= 0.70, metrics["iou"]
    # Every object class is learnt, not just the background and the commonest shape.
    assert min(metrics["iou"]["per_class"].values()) >= 0.5, metrics["iou"]["per_class"]
