"""Segmentation architectures segmentation-models-pytorch lacks: FCN and SegNet.

FCN is the fully convolutional network of Long, Shelhamer and Darrell ("Fully
Convolutional Networks for Semantic Segmentation", CVPR 2015) in the form
torchvision ships: a ResNet-50/101 whose last two stages are dilated instead of
strided (output stride 8), a small head (3x3 conv, batch norm, ReLU, dropout,
1x1 conv to class scores) and bilinear upsampling back to the input size. It is
torchvision's modern variant, not the paper's VGG FCN-8s with skip layers.

SegNet is the encoder-decoder of Badrinarayanan, Kendall and Cipolla ("SegNet: A
Deep Convolutional Encoder-Decoder Architecture for Image Segmentation", IEEE
TPAMI 2017), written here. The encoder is VGG with batch norm; every max-pool
remembers where each maximum came from, and the mirrored decoder upsamples by
putting values back at exactly those positions (max-unpooling, nothing learned),
then densifies the sparse map with 3x3 conv-BN-ReLU layers. As in the authors'
release, the decoder's very last 3x3 conv is the classifier (kept as ``head``);
it returns logits, the loss applies the softmax.

Both models expose ``encoder`` (keys compatible with torchvision checkpoints,
see :func:`adapt_state_dict`) and ``head``; SegNet also has ``decoder``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import segmentation, vgg

from segflow.errors import SegflowError

EXTRA_ARCHS: tuple[str, ...] = ("FCN", "SegNet")

_FCN_BUILDERS = {"resnet50": segmentation.fcn_resnet50, "resnet101": segmentation.fcn_resnet101}
#: torchvision's layer configurations for the VGG variants (11, 13 and 16 weight layers).
_VGG_CONFIGS = {"vgg11_bn": "A", "vgg13_bn": "B", "vgg16_bn": "D"}
#: The encoders each architecture here is built on, its original first (``segflow compare`` falls back to it).
ENCODERS: dict[str, tuple[str, ...]] = {"FCN": tuple(_FCN_BUILDERS), "SegNet": tuple(reversed(_VGG_CONFIGS))}
#: The top-level children of torchvision's ResNet that FCN's backbone keeps (avgpool and fc are cut off).
_RESNET_ENCODER_ROOTS = frozenset({"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"})


class FCN(nn.Module):
    """torchvision's FCN, returning the logits tensor instead of a dict.

    Attributes:
        encoder: the dilated ResNet (torchvision's ``IntermediateLayerGetter``, output stride 8).
        head: torchvision's ``FCNHead``.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Score every pixel.

        Args:
            x: (N, in_channels, H, W) float32 images; any H, W (output stride 8).

        Returns:
            (N, num_classes, H, W) float32 logits.
        """
        scores = self.head(self.encoder(x)["out"])
        return F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)


class _DecoderStage(nn.Module):
    """Max-unpool with the encoder's indices, then conv3x3-BN-ReLU layers."""

    def __init__(self, widths: list[tuple[int, int]]) -> None:
        super().__init__()
        self.unpool = nn.MaxUnpool2d(kernel_size=2, stride=2)
        # No conv bias: the batch norm right after it shifts the output anyway.
        layers = [(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(True)) for i, o in widths]
        self.convs = nn.Sequential(*(layer for triple in layers for layer in triple))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, size: torch.Size) -> torch.Tensor:
        if torch.jit.is_tracing():
            # MaxUnpool2d cannot be traced in torch 2.14 (its size check calls bool() on a traced size)
            # and the TorchScript ONNX exporter has no max_unpool2d; the same scatter, spelled out, exports.
            n, c = x.shape[:2]
            flat = x.new_zeros(n, c, size[0] * size[1]).scatter(2, indices.flatten(2), x.flatten(2))
            return self.convs(flat.view(n, c, size[0], size[1]))
        return self.convs(self.unpool(x, indices, output_size=size))


class SegNet(nn.Module):
    """SegNet: a VGG-BN encoder whose pooling indices drive the decoder's unpooling.

    Attributes:
        encoder: torchvision's VGG-BN ``features`` cut after its last used max-pool,
            with torchvision's indices (``0.weight``, ``1.running_mean``, ...).
        decoder: one :class:`_DecoderStage` per pool, deepest first.
        head: the last 3x3 conv, from the first stage's width to class logits (no BN/ReLU).
    """

    def __init__(self, encoder: nn.Sequential, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        stages: list[list[nn.Conv2d]] = [[]]
        for layer in encoder:
            if isinstance(layer, nn.Conv2d):
                stages[-1].append(layer)
            elif isinstance(layer, nn.MaxPool2d):
                stages.append([])
        stages.pop()  # the empty stage opened by the last pool
        # Each decoder conv undoes the shape of its encoder mirror image, in reverse order.
        mirrored = [[(conv.out_channels, conv.in_channels) for conv in reversed(stage)] for stage in stages]
        first = mirrored[0].pop()  # the one that would map back to image channels becomes the classifier
        self.decoder = nn.ModuleList(_DecoderStage(widths) for widths in reversed(mirrored))
        self.head = nn.Conv2d(first[0], num_classes, 3, padding=1)
        for module in [*self.decoder.modules(), self.head]:
            if isinstance(module, nn.Conv2d):
                _init_conv(module)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Size]]:
        """Run the encoder, keeping each pool's argmax positions and input size.

        Args:
            x: (N, in_channels, H, W) float32; H and W divisible by 2**encoder_depth.

        Returns:
            (N, C, H / 2**depth, W / 2**depth) features; per pool, shallowest first, the int64
            indices (N, C_i, H_i / 2, W_i / 2) into each flattened (H_i, W_i) plane and the size (H_i, W_i).
        """
        indices, sizes = [], []
        for layer in self.encoder:
            if isinstance(layer, nn.MaxPool2d):
                sizes.append(x.shape[-2:])
                # Called functionally so the encoder stays torchvision's plain Sequential (VGG: 2x2, stride 2).
                x, where = F.max_pool2d(x, layer.kernel_size, layer.stride, return_indices=True)
                indices.append(where)
            else:
                x = layer(x)
        return x, indices, sizes

    def decode(self, x: torch.Tensor, indices: list[torch.Tensor], sizes: list[torch.Size]) -> torch.Tensor:
        """Unpool and convolve back to full size; arguments as :meth:`encode` returns them.

        Returns:
            (N, num_classes, H, W) float32 logits.
        """
        for stage, where, size in zip(self.decoder, reversed(indices), reversed(sizes), strict=True):
            x = stage(x, where, size)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) float32 -> (N, num_classes, H, W) float32 logits."""
        return self.decode(*self.encode(x))


def _init_conv(conv: nn.Conv2d) -> None:
    # torchvision's VGG and ResNet initialisation, so replaced and new convs start alike.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _with_in_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A freshly initialised copy of ``conv`` that reads ``in_channels`` channels."""
    settings = {k: getattr(conv, k) for k in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")}
    new = nn.Conv2d(in_channels, conv.out_channels, bias=conv.bias is not None, **settings)
    _init_conv(new)
    return new


def build_fcn(encoder: str, num_classes: int, in_channels: int = 3) -> FCN:
    """torchvision's FCN on a randomly initialised ResNet-50 or ResNet-101.

    Returns:
        FCN mapping (N, in_channels, H, W) float32 to logits (N, num_classes, H, W).

    Raises:
        SegflowError: ``encoder`` is not resnet50 or resnet101.
    """
    if encoder not in _FCN_BUILDERS:
        raise SegflowError(
            "train.encoder: FCN is built on torchvision's resnet50 or resnet101 backbone "
            f"(fcn_resnet50 / fcn_resnet101), got {encoder!r}; set train.encoder: resnet50"
        )
    tv = _FCN_BUILDERS[encoder](weights=None, weights_backbone=None, aux_loss=False, num_classes=num_classes)
    if in_channels != 3:
        tv.backbone.conv1 = _with_in_channels(tv.backbone.conv1, in_channels)
    return FCN(tv.backbone, tv.classifier)


def build_segnet(encoder: str, encoder_depth: int, num_classes: int, in_channels: int = 3) -> SegNet:
    """SegNet on a randomly initialised VGG-BN encoder using its first ``encoder_depth`` pools.

    Returns:
        SegNet mapping (N, in_channels, H, W) float32, H and W divisible by 2**encoder_depth,
        to logits (N, num_classes, H, W).

    Raises:
        SegflowError: an encoder other than vgg11_bn / vgg13_bn / vgg16_bn, or a depth outside 3..5.
    """
    if encoder not in _VGG_CONFIGS:
        raise SegflowError(
            f"train.encoder: SegNet is built on torchvision's vgg11_bn, vgg13_bn or vgg16_bn, got {encoder!r}; "
            "set train.encoder: vgg16_bn"
        )
    if not 3 <= encoder_depth <= 5:
        raise SegflowError(f"train.encoder_depth: SegNet uses 3 to 5 pooling stages, got {encoder_depth}; set it to 5")
    # The same Sequential as vgg*_bn(weights=None).features, without allocating VGG's
    # 120M-parameter classifier only to throw it away.
    features = vgg.make_layers(vgg.cfgs[_VGG_CONFIGS[encoder]], batch_norm=True)
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            _init_conv(module)
    pools = [i for i, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)]
    # Slicing keeps torchvision's indices; layers past the last used pool would get no gradient.
    features = features[: pools[encoder_depth - 1] + 1]
    if in_channels != 3:
        features[0] = _with_in_channels(features[0], in_channels)
    return SegNet(features, num_classes)


def build(arch: str, encoder: str, encoder_depth: int, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build one of :data:`EXTRA_ARCHS`; FCN ignores ``encoder_depth`` (its backbone is fixed at stride 8).

    Returns:
        torch.nn.Module mapping (N, in_channels, H, W) float32 to logits (N, num_classes, H, W).

    Raises:
        SegflowError: an unknown arch or an encoder the arch cannot use.
    """
    _check_arch(arch)
    if arch == "FCN":
        return build_fcn(encoder, num_classes, in_channels)
    return build_segnet(encoder, encoder_depth, num_classes, in_channels)


def adapt_state_dict(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a foreign checkpoint's encoder tensors to the keys of ``model.encoder``.

    Understands, for FCN, torchvision fcn_resnet* (``backbone.*``) and plain resnet state
    dicts; for SegNet, torchvision vgg*_bn ones (``features.*``); and for both this module's
    own (``encoder.*``). Heads and classifiers are dropped. The caller filters by key and
    shape: a first conv of another channel count still comes through, and so do a full
    VGG's deeper layers when the SegNet is shallower than 5.

    Returns:
        The encoder's tensors, keyed as in ``model.encoder.state_dict()``.
    """
    _check_arch(arch)
    if arch == "FCN":
        prefix, in_encoder = "backbone.", _RESNET_ENCODER_ROOTS.__contains__
    else:
        prefix, in_encoder = "features.", str.isdigit  # VGG's Sequential indices
    adapted = {}
    for key, value in state.items():
        # Both prefixes in turn: smp-style checkpoints nest features under encoder.
        name = key.removeprefix("encoder.").removeprefix(prefix)
        if in_encoder(name.split(".", 1)[0]):
            adapted[name] = value
    return adapted


def _check_arch(arch: str) -> None:
    if arch not in EXTRA_ARCHS:
        raise SegflowError(f"train.arch: {arch!r} is not FCN or SegNet; smp's own archs go through smp.create_model")
