"""evaluate: scores full-size test images against the masks on disk."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from segflow.layout import (
    CONFUSION,
    EVAL_PIPELINE,
    METRICS,
    MODEL_DIR,
    PER_CLASS,
    PER_IMAGE,
    PREDICTIONS,
    SCORES,
    headline_metrics,
    load_transform,
    read_manifest,
    split_rows,
)
from segflow.semantic import evaluate, factory, store
from segflow.semantic.card import ModelCard, read_card
from segflow.semantic.dataset import SegmentationDataset


def test_perfect_predictions_score_one_and_padding_is_cropped(prepared):
    params, paths = prepared
    rows = split_rows(read_manifest(paths.ingest), "test")
    dataset = SegmentationDataset(paths.ingest, rows, load_transform(paths.augment / EVAL_PIPELINE))
    padded = []
    for index in range(len(dataset)):
        image, mask = dataset.load(index)
        truth = torch.from_numpy(mask.astype("int64"))
        pad = torch.full((64, 64), 3, dtype=torch.int64)  # garbage outside the image must not count
        pad[: truth.shape[0], : truth.shape[1]] = truth
        padded.append((index, image, mask, pad))
    summary, per_image, kept = evaluate.score(dataset, padded, params.classes, keep=1)
    assert summary["iou"]["macro"] == 1.0 and summary["pixel_accuracy"] == 1.0
    assert (per_image["iou_macro"] == 1.0).all() and len(per_image) == len(rows)
    assert list(kept) == [0]
    # The confusion matrix: all on the diagonal, each class's pixels as the manifest counts them.
    matrix = np.asarray(summary["confusion"]["counts"])
    assert (matrix == np.diag(np.diag(matrix))).all() and summary["confusion"]["most_confused"] == []
    for k, name in enumerate(params.classes):
        assert matrix[k, k] == rows[f"px_{name}"].sum()


class _Stub(torch.nn.Module):
    """Predicts class 1 everywhere: a known, wrong model (a real smp model adds nothing here but time)."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 4, *x.shape[2:])
        logits[:, 1] = 1.0
        return logits


def test_stage_run_writes_metrics_tables_and_preview(prepared, monkeypatch):
    params, paths = prepared
    card = ModelCard(
        arch="Unet",
        encoder="resnet18",
        encoder_depth=3,
        decoder_channels=[16, 8, 4],
        classes=params.classes,
        mean=params.augment.normalize.mean,
        std=params.augment.normalize.std,
        pad_divisor=32,
        train_size=32,
    )
    store.save(
        factory.create("Unet", "resnet18", 3, [16, 8, 4], 4),
        card,
        paths.augment / EVAL_PIPELINE,
        paths.train / MODEL_DIR,
    )
    monkeypatch.setattr(store, "load", lambda model_dir: (_Stub(), read_card(model_dir)))
    metrics = evaluate.run(params, paths)

    on_disk = json.loads((paths.evaluate / SCORES).read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["reduction"].startswith("per_class:")
    # metrics.json: the headline numbers only (no text, no per-class columns for `dvc metrics show`).
    headline = json.loads((paths.evaluate / METRICS).read_text())
    assert headline == headline_metrics(on_disk) and headline["iou"]["macro"] == on_disk["iou"]["macro"]
    flat = pd.json_normalize(headline).iloc[0]
    assert all(isinstance(v, int | float) for v in flat) and len(flat) <= 8
    manifest = read_manifest(paths.ingest)
    test_rows = manifest[manifest["split"] == "test"]
    assert on_disk["images"] == len(test_rows)
    # "disk everywhere": IoU of disk = disk pixels / all pixels; background, box, triangle score 0.
    disk_share = test_rows["px_disk"].sum() / (test_rows["height"] * test_rows["width"]).sum()
    assert on_disk["iou"]["per_class"]["disk"] == pytest.approx(disk_share, abs=1e-5)
    assert on_disk["iou"]["per_class"]["background"] == 0.0
    per_class = pd.read_csv(paths.evaluate / PER_CLASS)
    assert per_class["class"].tolist() == params.classes
    per_image = pd.read_csv(paths.evaluate / PER_IMAGE)
    assert set(per_image["id"]) == set(test_rows["id"])
    assert (paths.evaluate / PREDICTIONS).stat().st_size > 0
    # "disk everywhere": every true class's pixels are in the disk column; the matrix sums to the pixels.
    matrix = np.asarray(on_disk["confusion"]["counts"])
    assert matrix.sum() == (test_rows["height"] * test_rows["width"]).sum()
    assert (matrix[:, [0, 2, 3]] == 0).all()
    assert [m["predicted"] for m in on_disk["confusion"]["most_confused"]] == ["disk"] * 3
    assert (paths.evaluate / CONFUSION).stat().st_size > 0


def test_batched_evaluation_decodes_once_and_predicts_as_one_by_one(prepared):
    """Whole images go through the model in batches; each test image is decoded once; the class ids are the
    ones ``segflow predict`` gives image by image, in the same order (tiled images included)."""
    from segflow.semantic import infer

    params, paths = prepared
    rows = split_rows(read_manifest(paths.ingest), "test")
    dataset = SegmentationDataset(paths.ingest, rows, transform=None)
    torch.manual_seed(0)
    model = factory.create("Unet", "resnet18", 3, [16, 8, 4], 4).eval()
    card = ModelCard(
        arch="Unet", encoder="resnet18", encoder_depth=3, decoder_channels=[16, 8, 4], classes=params.classes,
        mean=params.augment.normalize.mean, std=params.augment.normalize.std, pad_divisor=8, train_size=32,
    )  # fmt: skip
    loads = []
    original = dataset.load
    dataset.load = lambda index: (loads.append(index), original(index))[1]
    forward = infer.torch_forward(model, "cpu")
    tiled = infer.Predictor(forward, card, tile_size=16, overlap=8, batch_size=3)  # 32-px images: 9 tiles
    whole = infer.Predictor(forward, card, tile_size=64, overlap=8, batch_size=3)  # in batches of 3
    for each in (tiled, whole):
        loads.clear()
        got = list(evaluate.predict(each, dataset))
        assert loads == list(range(len(dataset))), "each image decoded once, in order"
        assert [index for index, *_ in got] == list(range(len(dataset)))
        for index, image, mask, pred in got:
            assert (pred.numpy() == each.predict(image)).all(), f"image {index}"
            assert (mask == original(index)[1]).all()
