"""Inference on images of any size: tiles blend back into exactly the whole-image result."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

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
    the 3/8 of the overlap the blend keeps clear of a tile's inner edges, for any overlap of 16 or more)."""

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


@pytest.mark.parametrize(
    ("length", "tile", "step", "overlap"),
    [(1000, 256, 192, 64), (1000, 256, 128, 128), (608, 256, 32, 224), (512, 256, 256, 0), (768, 256, 128, 128)],
)
def test_seam_weights_take_each_pixel_from_its_most_central_tile(length, tile, step, overlap):
    starts = _axis_starts(length, tile, step)
    assert starts[0] == 0 and starts[-1] == length - tile
    weights = _axis_weights(starts, tile, overlap)
    total = np.zeros(length)
    for k, (s, w) in enumerate(zip(starts, weights, strict=True)):
        clear = 3 * overlap // 8  # a tile's logits within this of an inner edge never count
        if k > 0:
            assert (w[:clear] == 0).all()
        else:
            assert w[0] == 1, "the image border weighs fully: whole-image prediction sees the same border"
        if k + 1 < len(starts):
            assert (w[tile - clear :] == 0).all()
        else:
            assert w[-1] == 1
        total[s : s + tile] += w
    if 4 * step >= overlap:
        assert np.allclose(total, 1), "a partition of unity"
    assert (total >= 0.25).all()
    for a, b in itertools.pairwise(starts):  # the middle of an overlap: equally far from both tiles' edges
        meet = (b + a + tile) // 2
        in_a, in_b = weights[starts.index(a)][meet - a - 1], weights[starts.index(b)][meet - b]
        assert in_a >= 0.5 and in_b >= 0.5


def test_tiles_are_exact_where_a_unets_receptive_field_fits_the_blend():
    """A real architecture, seeded: Unet/resnet18 at depth 3 (stride 8). Its logits at a pixel depend on the
    input at most 65 px away (checked below, by autograd). The blend counts a tile's logits only at least
    3/8 of the overlap (72 px for 192) from its inner edges, so there the tile sees all the image the whole
    pass sees, on the same stride grid: tiled and whole logits agree to float rounding (measured 6e-8, bound
    1e-5, logits of standard deviation 0.09). The previous blend (weights from overlap/4: 48 px) was off by
    3.5e-4 here, and too small an overlap (12 px clear) by 0.23: the check can fail (its last line)."""
    from segflow.data.synthetic import make_scene
    from segflow.semantic.factory import create

    torch.manual_seed(0)
    model = create("Unet", "resnet18", 3, [16, 8, 4], 3).eval()
    reach = 0
    for centre in (128, 131):  # on the stride grid and off it
        x = torch.randn(1, 3, 256, 256, requires_grad=True)
        model(x)[0, :, centre, centre].sum().backward()
        rows, cols = np.nonzero(x.grad[0].abs().sum(0).numpy())
        reach = max(reach, centre - rows.min(), rows.max() - centre, centre - cols.min(), cols.max() - centre)
    assert reach < 3 * 192 // 8, "the premise: the receptive field fits in what the blend keeps clear"
    image, _ = make_scene(np.random.default_rng(0), 384, 3, np.array([0.4, 0.3, 0.3]), 8, 16, 0.05)
    forward = torch_forward(model, "cpu")
    whole = Predictor(forward, _card(pad=8), tile_size=512, overlap=0).logits(image)
    tiled = Predictor(forward, _card(pad=8), tile_size=256, overlap=192, batch_size=9).logits(image)
    assert np.abs(tiled - whole).max() < 1e-5
    short = Predictor(forward, _card(pad=8), tile_size=128, overlap=32, batch_size=16).logits(image)
    assert np.abs(short - whole).max() > 100 * 1e-5, "the check can fail: 12 px clear is short of 65 px"


@pytest.mark.parametrize(("channels", "given"), [(1, (5, 5, 3)), (3, (5, 5)), (3, (5, 5, 4)), (1, (5, 5, 1))])
def test_images_are_converted_to_the_models_channels(channels, given):
    image = np.full(given, 100, dtype=np.uint8)
    assert to_channels(image, channels).shape == (5, 5, channels)
    assert (to_channels(image, channels) == 100).all()


def test_the_trained_demo_model_agrees_tiled_and_whole():
    """The demo model (params.yaml: Unet/resnet18 depth 4, stride 16, trained on 96 px scenes) at the tile
    geometry production uses (overlap 128: each pixel at least 48 px, mostly 64 px, from a counted tile
    edge) on an image like its training data: 8 x 8 scenes of 96 px. Its receptive field (144 px) exceeds
    what an overlap of 128 keeps clear, so tiles cannot be exact; edge effects of demo-like models fade
    from ~1 logit at 32 px to a few hundredths at 64 px, and flip only pixels the model is unsure of
    (median top-2 margin ~0.1 logit). Measured on such a mosaic: 0.9998 (160 steps of training) and 0.9975
    (10 steps: a model unsure almost everywhere) of pixels agree, so 0.99 holds for any reasonably trained
    model. (Scenes rendered at 768 px are no test of this: their objects are 8 times those trained on and
    the model is unsure of much of them, so agreement measures the model, not the tiling.)"""
    from segflow.data.synthetic import make_scene
    from segflow.semantic import store
    from tests.conftest import ROOT

    folder = ROOT / "data/train/model"
    if not (folder / "model.json").is_file():
        pytest.skip("no trained demo model in this checkout (make demo trains it)")
    model, card = store.load(folder)
    weights = np.array([0.4, 0.32, 0.28])
    scenes = [make_scene(np.random.default_rng(1000 + i), 96, 3, weights, 2, 6, 0.05)[0] for i in range(64)]
    image = np.concatenate([np.concatenate(scenes[row * 8 : row * 8 + 8], axis=1) for row in range(8)])
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_asking_for_cuda_without_a_gpu_is_one_line():
    from segflow.errors import SegflowError
    from segflow.semantic.infer import torch_forward

    with pytest.raises(SegflowError, match=r"^--device cuda: no CUDA GPU is visible to torch here .*--device cpu"):
        torch_forward(torch.nn.Identity(), "cuda")
    with pytest.raises(SegflowError, match=r"^--device gpu0: not a torch device"):
        torch_forward(torch.nn.Identity(), "gpu0")


def test_an_output_folder_inside_an_input_folder_is_not_read_as_input(tmp_path):
    from segflow.semantic.predict import inputs

    (tmp_path / "in" / "out").mkdir(parents=True)
    for name in ("in/a.png", "in/b.png", "in/out/a.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name)
    found = [p.relative_to(tmp_path).as_posix() for p in inputs([tmp_path / "in"], out=tmp_path / "in" / "out")]
    assert found == ["in/a.png", "in/b.png"]
