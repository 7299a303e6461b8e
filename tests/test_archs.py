"""FCN and SegNet (segflow/semantic/archs.py): shapes, training, saving, SegNet's unpooling, checkpoint mapping."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.fcn import FCNHead

from segflow.errors import SegflowError
from segflow.semantic import archs

CLASSES = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tensors here are tiny: a second thread buys little, and on a busy two-core machine every op
    # waits for the descheduled one (this file: ~13 s on one thread, 30-40 s on two under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fcn():
    # ~33M parameters: built once here, and once more only for the round trip.
    torch.manual_seed(0)
    return archs.build_fcn("resnet50", CLASSES)


def _segnet(encoder="vgg11_bn", depth=3, in_channels=3):
    torch.manual_seed(0)
    return archs.build_segnet(encoder, depth, CLASSES, in_channels)


def _batch(n=2, channels=3, size=32):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(n, channels, size, size, generator=generator)
    target = torch.randint(0, CLASSES, (n, size, size), generator=generator)
    target[0, 0, 0] = 255  # an ignored pixel, as padding and void are labelled
    return images, target


def _train_step(model, images, target):
    """One SGD step; returns the loss and the parameters before the step."""
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(images), target, ignore_index=255)
    loss.backward()
    optimiser.step()
    return loss, before


def test_fcn_maps_images_to_logits_of_their_size(fcn):
    assert isinstance(fcn.encoder, IntermediateLayerGetter)
    assert isinstance(fcn.head, FCNHead)
    with torch.no_grad():
        logits = fcn.eval()(torch.randn(1, 3, 40, 48))  # FCN needs no divisibility: it upsamples to the input
    assert logits.shape == (1, CLASSES, 40, 48)
    assert logits.dtype == torch.float32


def test_fcn_reads_one_channel_images():
    # On the meta device: shapes and layer settings without allocating another 33M parameters.
    with torch.device("meta"):
        model = archs.build("FCN", "resnet50", 5, CLASSES, in_channels=1)
        logits = model(torch.empty(2, 1, 32, 32))
    assert logits.shape == (2, CLASSES, 32, 32)
    conv = model.encoder.conv1
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (1, 64, (7, 7))
    assert (conv.stride, conv.padding, conv.bias) == ((2, 2), (3, 3), None)


@pytest.mark.parametrize(("in_channels", "encoder", "depth"), [(3, "vgg16_bn", 5), (1, "vgg11_bn", 4)])
def test_segnet_maps_images_to_logits_of_their_size(in_channels, encoder, depth):
    model = _segnet(encoder, depth, in_channels).eval()
    assert model.encoder[0].in_channels == in_channels
    with torch.no_grad():
        logits = model(torch.randn(1, in_channels, 32, 64))
    assert logits.shape == (1, CLASSES, 32, 64)


def test_fcn_one_step_changes_weights_with_a_finite_loss(fcn):
    loss, before = _train_step(fcn, *_batch(size=16))
    assert torch.isfinite(loss)
    assert not torch.equal(before["head.4.weight"], fcn.head[4].weight)
    assert not torch.equal(before["encoder.conv1.weight"], fcn.encoder.conv1.weight)


@pytest.mark.parametrize(("encoder", "depth"), [("vgg11_bn", 5), ("vgg13_bn", 4), ("vgg16_bn", 3)])
def test_segnet_trains_every_parameter_at_each_depth(encoder, depth):
    model = _segnet(encoder, depth)
    pools = [layer for layer in model.encoder if isinstance(layer, torch.nn.MaxPool2d)]
    assert len(pools) == len(model.decoder) == depth
    assert model.encoder[-1] is pools[-1]  # cut right after the last used pool
    loss, before = _train_step(model, *_batch())  # 32x32: at depth 5 the smallest batch-norm input is 2x2
    assert torch.isfinite(loss)
    # A parameter without a gradient would be one the truncated encoder should not hold.
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    unchanged = [name for name, p in model.named_parameters() if torch.equal(before[name], p.detach())]
    # Conv biases followed by batch norm get an exactly zero gradient in training mode; all else moves.
    assert all(name.startswith("encoder.") and name.endswith(".bias") for name in unchanged)
    assert not torch.equal(before["head.weight"], model.head.weight)


def _round_trip(model, fresh, images, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), path)
    fresh.load_state_dict(load_file(path), strict=True)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), fresh.eval()(images))


def test_fcn_round_trips_through_safetensors(fcn, tmp_path):
    torch.manual_seed(1)  # a different initialisation, so only the load can make them agree
    _round_trip(fcn, archs.build_fcn("resnet50", CLASSES), _batch()[0], tmp_path)


def test_segnet_round_trips_through_safetensors(tmp_path):
    model = _segnet(in_channels=1)
    _train_step(model, *_batch(channels=1))  # moved batch-norm statistics must come back too
    torch.manual_seed(1)
    fresh = archs.build_segnet("vgg11_bn", 3, CLASSES, in_channels=1)
    _round_trip(model, fresh, _batch(channels=1)[0], tmp_path)


def test_segnet_unpools_at_the_encoders_argmax_positions():
    model = _segnet("vgg16_bn", 3).eval()
    images = _batch(n=1)[0]
    seen = {}
    model.decoder[0].unpool.register_forward_hook(lambda _m, args, out: seen.update(indices=args[1], out=out))
    with torch.no_grad():
        logits = model(images)
        features, indices, sizes = model.encode(images)
        before_pool = model.encoder[:-1](images)  # the deepest pool's input
    where = indices[-1]
    assert torch.equal(seen["indices"], where)
    # The recorded indices are the argmax of each 2x2 window of the pool's input.
    assert torch.equal(before_pool.flatten(2).gather(2, where.flatten(2)), features.flatten(2))
    # The unpool writes exactly there (where the maximum is not 0) and nowhere else.
    written = seen["out"].flatten(2) != 0
    expected = torch.zeros_like(written).scatter(2, where.flatten(2), features.flatten(2) != 0)
    assert expected.sum() > 100
    assert torch.equal(written, expected)
    # Indices follow the data (not one fixed corner of every window) and they matter:
    width = sizes[-1][1]
    corners = (where // width % 2) * 2 + where % width % 2
    assert corners.unique().numel() == 4
    rows = torch.arange(0, sizes[-1][0], 2)[:, None] * width
    top_left = (rows + torch.arange(0, width, 2)[None, :]).expand_as(where).contiguous()
    with torch.no_grad():
        assert torch.equal(model.decode(features, indices, sizes), logits)
        assert not torch.allclose(model.decode(features, [*indices[:-1], top_left], sizes), logits)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: archs.build_fcn("resnet18", CLASSES), "train.encoder: FCN is built on torchvision's resnet50"),
        (lambda: archs.build("FCN", "vgg16_bn", 5, CLASSES), "got 'vgg16_bn'; set train.encoder: resnet50"),
        (lambda: archs.build_segnet("vgg16", 5, CLASSES), "vgg11_bn, vgg13_bn or vgg16_bn, got 'vgg16'"),
        (lambda: archs.build_segnet("vgg19_bn", 5, CLASSES), "got 'vgg19_bn'; set train.encoder: vgg16_bn"),
        (lambda: archs.build_segnet("vgg16_bn", 6, CLASSES), "train.encoder_depth: SegNet uses 3 to 5"),
        (lambda: archs.build("Unet", "resnet18", 5, CLASSES), "train.arch: 'Unet' is not FCN or SegNet"),
        (lambda: archs.adapt_state_dict("segnet", {}), "train.arch: 'segnet' is not FCN or SegNet"),
    ],
)
def test_bad_choices_are_one_line_errors(call, message):
    with pytest.raises(SegflowError, match=message) as caught:
        call()
    assert "\n" not in str(caught.value)


def test_build_dispatches_to_both():
    assert archs.EXTRA_ARCHS == ("FCN", "SegNet")
    with torch.device("meta"):
        assert isinstance(archs.build("FCN", "resnet101", 5, CLASSES), archs.FCN)
        segnet = archs.build("SegNet", "vgg13_bn", 4, CLASSES, in_channels=1)
    assert isinstance(segnet, archs.SegNet)
    assert len(segnet.decoder) == 4
    assert segnet.encoder[0].in_channels == 1


def _assert_covers(adapted, encoder):
    own = encoder.state_dict()
    assert adapted.keys() == own.keys()
    assert {k: v.shape for k, v in adapted.items()} == {k: v.shape for k, v in own.items()}


def test_adapt_maps_torchvision_vgg16_bn_onto_segnet():
    model = _segnet("vgg16_bn", 5)
    # Keys and shapes are what matter; the meta device skips VGG's 120M-parameter classifier (seconds).
    with torch.device("meta"):
        state = torchvision.models.vgg16_bn(weights=None).state_dict()
    assert any(key.startswith("classifier.") for key in state)
    adapted = archs.adapt_state_dict("SegNet", state)
    _assert_covers(adapted, model.encoder)
    assert not any(key.startswith("classifier") for key in adapted)
    generator = torch.Generator().manual_seed(2)
    adapted = {k: torch.randn(v.shape, generator=generator).to(v.dtype) for k, v in adapted.items()}
    model.encoder.load_state_dict(adapted, strict=True)
    assert torch.equal(model.encoder[40].weight, adapted["40.weight"])
    # Its own checkpoint (and an smp-style encoder.features.* one) maps back too.
    _assert_covers(archs.adapt_state_dict("SegNet", model.state_dict()), model.encoder)
    nested = {f"encoder.{key}": value for key, value in state.items()}
    _assert_covers(archs.adapt_state_dict("SegNet", nested), model.encoder)
    # A truncated encoder takes the leading part; the caller drops the keys it lacks.
    shallow = _segnet("vgg16_bn", 3).encoder
    shallow.load_state_dict({k: v for k, v in adapted.items() if k in shallow.state_dict()}, strict=True)


def test_adapt_maps_torchvision_resnet50_and_fcn_resnet50_onto_fcn(fcn):
    resnet = torchvision.models.resnet50(weights=None).state_dict()
    adapted = archs.adapt_state_dict("FCN", resnet)
    _assert_covers(adapted, fcn.encoder)
    assert "fc.weight" in resnet and not any(key.startswith("fc.") for key in adapted)

    tv_fcn = torchvision.models.segmentation.fcn_resnet50(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    ).state_dict()
    adapted = archs.adapt_state_dict("FCN", tv_fcn)
    _assert_covers(adapted, fcn.encoder)
    assert any(key.startswith("aux_classifier.") for key in tv_fcn)
    assert torch.equal(adapted["layer4.2.conv3.weight"], tv_fcn["backbone.layer4.2.conv3.weight"])
    _assert_covers(archs.adapt_state_dict("FCN", fcn.state_dict()), fcn.encoder)


def test_segnet_exports_to_onnx_with_the_same_logits(tmp_path):
    # Exporting traces the model, which takes the decoder's scatter path instead of MaxUnpool2d.
    onnxruntime = pytest.importorskip("onnxruntime")
    model = _segnet(in_channels=1).eval()
    path = tmp_path / "model.onnx"
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the TorchScript exporter (the project's) is the old one
        torch.onnx.export(
            model,
            (torch.randn(1, 1, 32, 32),),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": axes, "logits": axes},
            opset_version=17,
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = _batch(channels=1, size=64)[0]  # another size and batch than the traced one
    with torch.no_grad():
        expected = model(images)
    got = torch.from_numpy(session.run(None, {"image": images.numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("arch", "encoder"), [("SegNet", "vgg11_bn"), ("FCN", "resnet50")])
def test_the_factory_card_save_load_and_predict_path_takes_both(arch, encoder, tmp_path):
    """Through segflow's own path: params -> factory -> safetensors + card -> load (no pickle) -> Predictor."""
    import numpy as np

    from segflow.params import TrainParams
    from segflow.semantic import export, factory, infer, store
    from segflow.semantic.card import ModelCard

    cfg = TrainParams(arch=arch, encoder=encoder, encoder_depth=3)
    model = factory.build(cfg, num_classes=3, in_channels=1)
    card = ModelCard(
        arch=arch, encoder=encoder, encoder_depth=3, in_channels=1, classes=["a", "b", "c"],
        mean=[0.5], std=[0.25], pad_divisor=8, train_size=32,
    )  # fmt: skip
    preprocess = tmp_path / "eval.json"
    preprocess.write_text("{}")
    # SegNet's ONNX export goes through the same check against PyTorch as every exported model.
    onnx = arch == "SegNet" and importlib.util.find_spec("onnxruntime") is not None
    store.save(model, card, preprocess, tmp_path / "model")
    if onnx:
        exported = export.write(tmp_path / "model", tmp_path / "export", ["onnx"])
        assert exported.exports["onnx"]["max_abs_logit_diff"] < 1e-3
    assert any(key.startswith("encoder.") for key in load_file(tmp_path / "model" / "model.safetensors"))
    loaded, loaded_card = store.load(tmp_path / "model")
    assert type(loaded).__name__ == arch and loaded_card.arch == arch
    image = np.random.default_rng(0).integers(0, 255, (37, 45), dtype=np.uint8)
    predictor = infer.Predictor(infer.torch_forward(loaded, "cpu"), loaded_card, tile_size=64, overlap=16)
    expected = infer.Predictor(infer.torch_forward(model.eval(), "cpu"), card, tile_size=64, overlap=16)
    labels = predictor.predict(image)
    assert labels.shape == (37, 45) and set(np.unique(labels)) <= {0, 1, 2}
    assert np.array_equal(labels, expected.predict(image))
