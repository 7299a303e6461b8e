"""Inference on images of any size: tiles blend back into exactly the whole-image result."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from segflow.errors import SegflowError
from segflow.semantic.card import ModelCard
from segflow.semantic.infer import Predictor, _axis_starts, _axis_weights, to_channels, torch_forward


def _card(classes=3, channels=3, pad=32) -> ModelCard:
    return ModelCard(
        arch="Unet",
        encoder="resnet18",
        encoder_depth=3,
        classes=[f"c{i}" for i in range(classes)],
        in_channels=channels,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        pad_divisor=pad,
        train_size=64,
    )


class ConvStub(torch.nn.Module):
    """Three 3x3 convolutions: each output pixel sees 3 pixels around it (a receptive field that fits in
    overlap / 4 for any overlap of 12 or more)."""

    def __init__(self, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, classes, 3, padding=1),
        )

    def forward(self, x):
        return self.net(x)


def test_tiles_give_the_whole_image_logits_for_a_model_that_fits_the_overlap():
    image = np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    forward = torch_forward(ConvStub(), "cpu")
    whole = Predictor(forward, _card(), tile_size=2016, overlap=0).logits(image)
    tiled = Predictor(forward, _card(), tile_size=256, overlap=64, batch_size=8).logits(image)
    assert tiled.shape == whole.shape == (3, 1500, 2000)
    assert np.abs(tiled - whole).max() < 1e-5


def test_memory_per_forward_is_bounded_by_the_tile():
    shapes = []

    def forward(batch):
        shapes.append(batch.shape)
        return np.zeros((batch.shape[0], 2, *batch.shape[2:]), dtype=np.float32)

    Predictor(forward, _card(classes=2), tile_size=128, overlap=32, batch_size=2).predict(
        np.zeros((1000, 700, 3), dtype=np.uint8)
    )
    assert max(s[0] for s in shapes) <= 2 and max(max(s[2:]) for s in shapes) == 128


def test_small_images_go_through_whole_padded_to_the_stride():
    seen = []

    def forward(batch):
        seen.append(batch.shape)
        return np.ones((batch.shape[0], 2, *batch.shape[2:]), dtype=np.float32)

    mask = Predictor(forward, _card(classes=2, channels=1), tile_size=256).predict(np.zeros((50, 70), np.uint8))
    assert seen == [(1, 1, 64, 96)] and mask.shape == (50, 70)


def test_seam_weights_vanish_near_inner_edges_and_cover_every_pixel():
    starts = _axis_starts(1000, 256, 192)
    assert starts[0] == 0 and starts[-1] == 1000 - 256
    total = np.zeros(1000)
    for s in starts:
        w = _axis_weights(s, 256, 1000, 64)
        if s > 0:
            assert (w[:16] == 0).all()
        if s + 256 < 1000:
            assert (w[-16:] == 0).all()
        total[s : s + 256] += w
    assert (total > 0).all()


@pytest.mark.parametrize(("channels", "given"), [(1, (5, 5, 3)), (3, (5, 5)), (3, (5, 5, 4)), (1, (5, 5, 1))])
def test_images_are_converted_to_the_models_channels(channels, given):
    image = np.full(given, 100, dtype=np.uint8)
    assert to_channels(image, channels).shape == (5, 5, channels)
    assert (to_channels(image, channels) == 100).all()


def test_the_trained_demo_model_agrees_tiled_and_whole():
    from segflow.data.synthetic import make_scene
    from segflow.semantic import store
    from tests.conftest import ROOT

    folder = ROOT / "data/train/model"
    if not (folder / "model.json").is_file():
        pytest.skip("no trained demo model in this checkout (make demo trains it)")
    model, card = store.load(folder)
    image, _ = make_scene(np.random.default_rng(5), 768, 3, np.array([0.4, 0.32, 0.28]), 8, 16, 0.05)
    forward = torch_forward(model, "cpu")
    whole = Predictor(forward, card, tile_size=1024, overlap=0).predict(image)
    tiled = Predictor(forward, card, tile_size=256, overlap=128).predict(image)
    assert (whole == tiled).mean() >= 0.99


def test_predict_refuses_outputs_that_would_overwrite_each_other_or_an_input(tmp_path):
    from segflow.semantic.predict import check_targets

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one, two = tmp_path / "a/x.png", tmp_path / "b/x.jpg"
    for path in (one, two):
        path.write_bytes(b"")
    with pytest.raises(SegflowError, match=r"b/x.jpg and .*a/x.png would both be written to .*out/x.png"):
        check_targets([one, two], tmp_path / "out")
    with pytest.raises(SegflowError, match=r"a/x.png: is an input image"):
        check_targets([one], tmp_path / "a")
    check_targets([one], tmp_path / "out", with_overlay=True)  # distinct names: fine


def test_tiles_start_on_the_model_stride_whatever_the_overlap():
    predictor = Predictor(lambda batch: batch, _card(pad=32), tile_size=256, overlap=50)
    windows = list(predictor._windows(1504, 2016))
    assert {y % 32 for y, _, _, _ in windows} == {0} and {x % 32 for _, x, _, _ in windows} == {0}
    starts = sorted({x for _, x, _, _ in windows})
    assert max(b - a for a, b in itertools.pairwise(starts)) <= 256 - 50, "at least the overlap asked"
