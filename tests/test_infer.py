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


# Streaming: large images in strips of rows, decoded, predicted and written without holding them whole.


def _recording(forward, seen):
    def record(batch):
        seen.append(batch.copy())
        return forward(batch)

    return record


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap", "batch", "channels", "strip"),
    [
        (1001, 707, 128, 32, 3, 3, 37),  # several tile rows and columns, batches across tile rows
        (333, 1211, 128, 48, 4, 3, 1000),  # one strip holds it all
        (517, 300, 96, 32, 5, 1, 7),  # an RGB image for a gray model (luma), batches of 5 in 3 columns
        (700, 130, 128, 32, 4, 3, 1),  # one tile column: a batch spans four tile rows; strips of one row
        (90, 100, 128, 32, 4, 3, 10),  # fits one tile: predicted whole
    ],
)
def test_a_streamed_image_gets_exactly_the_class_ids_predict_gives(
    height, width, tile, overlap, batch, channels, strip
):
    """Same tiles, same batches, same sums in the same order: the ids are equal, not merely close, and the
    model sees bit-identical batches (sizes chosen off the stride, strips of odd heights)."""
    image = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    torch.manual_seed(0)
    model = ConvStub(classes=4) if channels == 3 else torch.nn.Conv2d(1, 4, 3, padding=1)
    whole_batches, streamed_batches = [], []
    card = _card(classes=4, channels=channels)
    whole = Predictor(_recording(torch_forward(model, "cpu"), whole_batches), card, tile, overlap, batch)
    streamed = Predictor(_recording(torch_forward(model, "cpu"), streamed_batches), card, tile, overlap, batch)
    expected = whole.predict(image)
    parts = list(streamed.stream((image[y : y + strip] for y in range(0, height, strip)), height, width))
    assert np.array_equal(np.concatenate([ids for _, ids in parts]), expected)
    assert np.array_equal(np.concatenate([rows for rows, _ in parts]), image), "the rows come back with their ids"
    assert len(whole_batches) == len(streamed_batches)
    assert all(np.array_equal(a, b) for a, b in zip(whole_batches, streamed_batches, strict=True))
    if height > tile:
        assert len(parts) > 1, "rows are handed on as they finish, not at the end"


def test_a_stream_that_does_not_make_up_the_image_is_refused():
    predictor = Predictor(lambda b: np.zeros((len(b), 2, *b.shape[2:]), np.float32), _card(classes=2), 64, 16)
    image = np.zeros((200, 100, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="ended at row 150 of 200"):
        list(predictor.stream([image[:150]], 200, 100))
    with pytest.raises(ValueError, match="does not fit the image"):
        list(predictor.stream([image[:, :90]], 200, 100))


def _chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _encode_png(raw: np.ndarray, width: int, depth: int, colour: int, extra: bytes = b"", seed: int = 0) -> bytes:
    """A PNG of unfiltered rows ``raw`` (H, row bytes), each row under a random filter (None, Sub, Up, Average,
    Paeth: the ones whose undoing needs the row above and the pixel to the left), in IDAT chunks of 5000 bytes."""
    import struct
    import zlib

    bpp = max(1, {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour] * depth // 8)
    height, size = raw.shape
    x = raw.astype(np.int16)
    up = np.concatenate([np.zeros((1, size), np.int16), x[:-1]])
    left = np.concatenate([np.zeros((height, bpp), np.int16), x[:, :-bpp]], axis=1)
    corner = np.concatenate([np.zeros((height, bpp), np.int16), up[:, :-bpp]], axis=1)
    guess = left + up - corner
    near_left, near_up, near_corner = abs(guess - left), abs(guess - up), abs(guess - corner)
    paeth = np.where(
        (near_left <= near_up) & (near_left <= near_corner), left, np.where(near_up <= near_corner, up, corner)
    )
    predictions = [np.zeros_like(x), left, up, (left + up) // 2, paeth]
    kinds = np.random.default_rng(seed).integers(0, 5, height)
    rows = np.empty((height, size + 1), np.uint8)
    rows[:, 0] = kinds
    for kind, prediction in enumerate(predictions):
        rows[kinds == kind, 1:] = ((x - prediction) % 256)[kinds == kind].astype(np.uint8)
    data = zlib.compress(rows.tobytes(), 6)
    idat = b"".join(_chunk(b"IDAT", data[i : i + 5000]) for i in range(0, len(data), 5000))
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + extra + idat + _chunk(b"IEND", b"")


_COLOUR_DEPTHS = [(0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (2, 8), (2, 16), (3, 1), (3, 2), (3, 4), (3, 8)]


@pytest.mark.parametrize(("colour", "depth"), [*_COLOUR_DEPTHS, (4, 8), (4, 16), (6, 8), (6, 16)])
@pytest.mark.filterwarnings("ignore:Palette images with Transparency")  # Pillow's, whole or in strips
def test_png_strips_are_the_pixels_whole_decoding_gives(tmp_path, colour, depth):
    """Every colour type and depth, every filter, palettes with transparency, strips from one row to all:
    the strips put together equal what predict's whole-image read gives (16-bit scaled to 8 the same way)."""
    from segflow import pngstream
    from segflow.semantic.predict import read

    width, height = 37, 53
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    rng = np.random.default_rng(colour * 100 + depth)
    raw = rng.integers(0, 256, (height, (width * channels * depth + 7) // 8), dtype=np.uint8)
    extra = b""
    if colour == 3:  # a palette shorter than the indices reach, and partly transparent
        extra = _chunk(b"PLTE", rng.integers(0, 256, 3 * min(2**depth, 200), dtype=np.uint8).tobytes())
        extra += _chunk(b"tRNS", bytes([0, 128]))
    elif depth == 8 and colour in (0, 2):
        extra = _chunk(b"tRNS", b"\0\5" * (1 if colour == 0 else 3))
    path = tmp_path / "image.png"
    path.write_bytes(_encode_png(raw, width, depth, colour, extra, seed=depth))
    expected = read(path)
    info = pngstream.scan(path)
    assert info is not None and info.whole_only is None and info.channels == expected.shape[2]
    for strip_bytes in (1, 300, 10**6):
        strips = list(pngstream.strips(info, strip_bytes))
        assert np.array_equal(np.concatenate(strips), expected)
        assert len(strips) == -(-height // max(1, strip_bytes // (info.row_bytes + 1)))


def test_pngs_that_are_not_rows_in_order_are_decoded_whole(tmp_path):
    """Interlaced, animated or turned by EXIF: their stored rows are not the picture's rows."""
    import struct
    import zlib

    from segflow import pngstream

    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "plain.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(image).save(tmp_path / "turned.png", exif=exif)
    Image.fromarray(image).save(tmp_path / "animated.png", save_all=True, append_images=[Image.fromarray(image[::-1])])
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", 30, 20, 8, 2, 0, 0, 1))
    data = _chunk(b"IDAT", zlib.compress(b"\0" * 2000))
    (tmp_path / "interlaced.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + data + _chunk(b"IEND", b""))
    (tmp_path / "jpeg.png").write_bytes(b"\xff\xd8\xff\xe0 not a png")
    found = {name: pngstream.scan(tmp_path / f"{name}.png") for name in ("plain", "turned", "animated", "interlaced")}
    assert {name: info.whole_only for name, info in found.items()} == {
        "plain": None,
        "turned": "a PNG turned by its EXIF orientation",
        "animated": "an animated PNG",
        "interlaced": "an interlaced PNG",
    }
    assert pngstream.scan(tmp_path / "jpeg.png") is None


@pytest.mark.parametrize("channels", [1, 3])
def test_the_png_writer_writes_what_pillow_reads_back(tmp_path, channels):
    from segflow.pngstream import PngWriter

    shape = (301, 123) if channels == 1 else (301, 123, 3)
    image = np.random.default_rng(channels).integers(0, 256, shape, dtype=np.uint8)
    image[100:200] = image[100]  # repeated rows, as a mask has
    with PngWriter(tmp_path / "out.png", 123, 301, channels) as writer:
        for top in (0, 1, 50, 222):
            writer.write(image[top : {0: 1, 1: 50, 50: 222, 222: 301}[top]])
    with Image.open(tmp_path / "out.png") as img:
        assert img.mode == ("L" if channels == 1 else "RGB") and np.array_equal(np.asarray(img), image)
    with (
        pytest.raises(ValueError, match="1 rows written of the 2 declared"),
        PngWriter(tmp_path / "short.png", 123, 2, channels) as writer,
    ):
        writer.write(image[:1])


def _stub_predictor(classes: int = 3, tile: int = 128):
    mix = np.random.default_rng(0).standard_normal((classes, 3)).astype(np.float32)
    return Predictor(lambda batch: np.einsum("kc,nchw->nkhw", mix, batch), _card(classes=classes), tile, 32, 4)


def test_predict_streams_a_png_into_the_same_mask_and_overlay(tmp_path):
    from segflow.semantic.predict import run

    image = np.random.default_rng(0).integers(0, 256, (700, 610, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    predictor = _stub_predictor()
    for stream in (False, True):
        assert run(predictor, [tmp_path / "a.png"], tmp_path / str(stream), True, False, stream=stream) == (1, [])
    for name in ("a.png", "a_overlay.png"):
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "False" / name)), np.asarray(Image.open(tmp_path / "True" / name))
        )


def test_a_png_damaged_part_way_leaves_no_mask(tmp_path):
    """Streaming finds damage only when it gets there, after rows were written: the error is one line and
    the half-written mask and overlay are removed (atomic_path), so nothing that looks finished is left."""
    import struct

    from segflow import pngstream
    from segflow.semantic.predict import run

    image = np.random.default_rng(0).integers(0, 256, (700, 610, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    data = bytearray((tmp_path / "a.png").read_bytes())
    offset, length = pngstream.scan(tmp_path / "a.png").idat[-3]  # an IDAT chunk near the end: a bad CRC
    struct.pack_into(">I", data, offset + length, struct.unpack_from(">I", data, offset + length)[0] ^ 1)
    (tmp_path / "damaged.png").write_bytes(bytes(data))
    rows = []
    predictor = _stub_predictor()
    stream = predictor.stream

    def counted(*args):
        for given, ids in stream(*args):
            rows.append(len(ids))
            yield given, ids

    predictor.stream = counted
    written, errors = run(predictor, [tmp_path / "damaged.png"], tmp_path / "out", True, False, stream=True)
    assert sum(rows) > 300, "rows were written before the damage was reached"
    assert (written, errors) == (
        0,
        [f"{tmp_path / 'damaged.png'}: cannot be decoded (broken PNG file: an IDAT chunk fails its CRC)"],
    )
    assert list((tmp_path / "out").iterdir()) == []


def test_an_image_too_large_to_decode_whole_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    """A JPEG is decoded whole; when that and predicting it need more than the memory available, the refusal
    comes before any of it is taken, not as numpy's ArrayMemoryError part-way."""
    from segflow.semantic import predict

    Image.fromarray(np.zeros((1000, 1500, 3), dtype=np.uint8)).save(tmp_path / "big.jpg")
    predictor = _stub_predictor()
    written, errors = predict.run(predictor, [tmp_path / "big.jpg"], tmp_path / "out", progress=False, available=2**20)
    assert written == 0 and len(errors) == 1
    need = predictor.whole_bytes(1000, 1500) + 3 * 1500 * 1000  # the decoded image, and predict()'s arrays
    assert errors[0] == (
        f"{tmp_path / 'big.jpg'}: 1500x1000 (1,500,000 pixels) needs about {need / 2**20:.0f} MiB to predict "
        "whole (it is a JPEG file), and 1 MiB is available (given); convert it to a non-interlaced PNG, which "
        "segflow streams, or split it into smaller images"
    )
    assert predict.run(predictor, [tmp_path / "big.jpg"], tmp_path / "out", progress=False) == (1, [])
    monkeypatch.setattr(predict, "STREAM_MAX_PIXELS", 1000)
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(tmp_path / "huge.png")
    _, errors = predict.run(predictor, [tmp_path / "huge.png"], tmp_path / "out", progress=False, stream=True)
    assert errors == [
        f"{tmp_path / 'huge.png'}: is 50x40 (2,000 pixels), above the 1,000 that predict streams; "
        "split it into smaller images"
    ]


_PEAK_CHILD = """
import sys
from pathlib import Path

import numpy as np

from segflow.semantic import predict
from segflow.semantic.card import ModelCard
from segflow.semantic.infer import Predictor


def hwm():
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


card = ModelCard(arch="Unet", encoder="resnet18", encoder_depth=3, classes=["a", "b", "c"], in_channels=3,
                 mean=[0.5] * 3, std=[0.25] * 3, pad_divisor=32, train_size=64)
mix = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)
predictor = Predictor(lambda batch: np.einsum("kc,nchw->nkhw", mix, batch), card, 512, 128, 4)
predictor.forward(np.zeros((4, 3, 512, 512), np.float32))  # the model's own memory, before the image's
before = hwm()
written, errors = predict.run(predictor, [Path(sys.argv[1])], Path(sys.argv[2]), progress=False)
assert written == 1 and not errors, errors
width, height = int(sys.argv[3]), int(sys.argv[4])
print(hwm() - before, predictor.stream_bytes(height, width), predictor.whole_bytes(height, width))
"""


def test_a_large_png_predicts_in_memory_bounded_by_its_width(tmp_path):
    """A 3000 x 2500 PNG through ``segflow predict``'s run, in a fresh process: it is streamed, and the peak
    RSS it adds (VmHWM, beyond the model's own) stays within twice the streamed need plus 32 MiB for decoding
    strips, under half of what predicting it whole needs (the old path's arrays: about 400 MiB here)."""
    import subprocess
    import sys

    from segflow.pngstream import PngWriter
    from tests.conftest import ROOT

    width, height = 3000, 2500
    rng = np.random.default_rng(0)
    with PngWriter(tmp_path / "large.png", width, height, 3, level=1) as writer:
        for _ in range(0, height, 250):
            writer.write(rng.integers(0, 256, (250, width, 3), dtype=np.uint8))
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _PEAK_CHILD,
            str(tmp_path / "large.png"),
            str(tmp_path / "out"),
            str(width),
            str(height),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    added, streamed, whole = map(int, done.stdout.split())
    budget = 2 * streamed + 32 * 2**20
    naive = whole + 3 * width * height  # the image, and predict()'s arrays
    assert budget < naive / 2, "the budget would catch the whole-image path"
    assert added < budget, f"streaming added {added / 2**20:.0f} MiB, over the {budget / 2**20:.0f} MiB budget"
    with Image.open(tmp_path / "out" / "large.png") as mask:
        assert mask.size == (width, height) and mask.mode == "L"


def _local_brightness(batch: np.ndarray) -> np.ndarray:
    """A model that calls a pixel class 1 where its 7x7 neighbourhood is bright (normalised mean > 0)."""
    x = torch.from_numpy(np.ascontiguousarray(batch[:, :1]))
    mean = torch.nn.functional.conv2d(x, torch.full((1, 1, 7, 7), 1 / 49), padding=3)
    return torch.cat([-mean, mean], dim=1).numpy()


@pytest.mark.parametrize("tile", [64, 32], ids=["whole", "tiled"])
def test_padding_reflects_the_image_so_the_bottom_rows_are_not_invented(tile, tmp_path):
    """A uniform bright 40x45 image padded to 64x64: zero padding would make a dark border the model sees from
    the last rows (their class flips), reflection shows it more of the image; whole, tiled and streamed agree."""
    card = _card(classes=2, pad=32)
    image = np.full((40, 45, 3), 200, dtype=np.uint8)
    predictor = Predictor(_local_brightness, card, tile_size=tile, overlap=16)
    x = predictor.prepare(image)
    assert x.shape == (3, 64, 64)
    assert np.array_equal(x[:, 40:42], x[:, 38:36:-1]) and np.array_equal(x[:, :, 45:47], x[:, :, 43:41:-1])
    zero = np.zeros((64, 64, 3), dtype=np.uint8)
    zero[:40, :45] = image
    zero_x = ((zero.astype(np.float32) - predictor._mean) / predictor._std).transpose(2, 0, 1)
    with_zeros = _local_brightness(zero_x[None])[0, :, :40, :45].argmax(0)
    assert (with_zeros[-2:] == 0).any(), "premise: zero padding changes the bottom rows"
    assert (predictor.predict(image) == 1).all()
    strips = [image[i : i + 7] for i in range(0, 40, 7)]
    streamed = np.concatenate([ids for _, ids in predictor.stream(strips, 40, 45)])
    assert (streamed == 1).all()


def test_validation_pads_by_reflection_and_never_scores_the_padding():
    from segflow.augment import build_eval_transform
    from segflow.params import IGNORE_INDEX, AugmentParams
    from segflow.semantic.dataset import SegmentationDataset
    from segflow.semantic.infer import padded_index

    transform = build_eval_transform(AugmentParams(pad_divisor=32))
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = np.ones((40, 50), dtype=np.uint8)
    dataset = SegmentationDataset(".", __import__("pandas").DataFrame({"id": ["a"]}), transform)
    dataset.load = lambda index: (image, mask)
    x, y, _ = dataset[0]
    assert tuple(x.shape) == (3, 64, 64)
    reflected = image[padded_index(40, 64)[:, None], padded_index(50, 64)[None, :]]
    assert np.array_equal(
        transform(image=reflected, mask=np.zeros((64, 64), np.uint8))["image"].transpose(2, 0, 1), x.numpy()
    )
    assert (y[:40, :50] == 1).all() and (y[40:] == IGNORE_INDEX).all() and (y[:, 50:] == IGNORE_INDEX).all()


def test_overlay_leaves_only_the_named_background_uncoloured():
    from segflow.semantic.predict import overlay

    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    mask = np.array([[0, 1, 2], [0, 1, 2]], dtype=np.uint8)
    sky_first = overlay(image, mask, 3)  # CamVid: class 0 is sky, an object like the others
    assert (sky_first[:, 0] != 100).any()
    plain = overlay(image, mask, 3, background=0)
    assert (plain[:, 0] == 100).all() and (plain[:, 1:] != 100).any()
