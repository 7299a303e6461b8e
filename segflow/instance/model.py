"""torchvision's Mask R-CNN on the backbones params name, sized for the images it is trained on.

Random init by default: no weights are fetched from a hub (torchvision's v1 builder downloads ImageNet
backbone weights unless told not to; everything here passes ``weights=None``). From scratch the
backbones train their BatchNorm layers (torchvision freezes them only for pretrained backbones).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from segflow.errors import SegflowError

#: Anchor aspect ratios per feature level (torchvision's).
_RATIOS = (0.5, 1.0, 2.0)


def anchor_sizes(image_size: int, levels: int = 5, smallest: int | None = None) -> tuple[tuple[int, ...], ...]:
    """Anchor sizes per FPN level for images of about ``image_size`` pixels a side.

    torchvision's (32 .. 512 px) suit 800-px images; a 96-px demo crop holds objects of 14-40 px, which
    such anchors barely overlap. The smallest anchor is an eighth of the image (8 to 32 px), doubling
    per level.
    """
    smallest = smallest or int(min(32, max(8, round(image_size / 8))))
    return tuple((smallest * 2**level,) for level in range(levels))


def build(
    encoder: str,
    num_categories: int,
    image_size: int,
    *,
    min_size: int | None = None,
    max_size: int | None = None,
    mean: list[float],
    std: list[float],
    detections: int = 100,
    score_threshold: float = 0.05,
    rpn_post_nms_top_n: int = 1000,
    width: int = 256,
    rois_per_image: int = 512,
    anchor_size: int | None = None,
) -> MaskRCNN:
    """A Mask R-CNN for ``num_categories`` object categories (plus background), randomly initialised.

    Args:
        encoder: resnet18 | resnet34 (FPN over torchvision's ResNet) | resnet50 (``maskrcnn_resnet50_fpn_v2``)
            | mobilenet_v3_large (FPN over its last two stages).
        image_size: the training crop (anchors are sized from it).
        min_size, max_size: the model's own resize (short side to ``min_size``, long side at most
            ``max_size``); both None: no resize at all, in training or at inference (an image is seen at
            the scale it was trained at, whatever its size).
        mean, std: per input channel, on the 0-1 scale (grayscale: repeated to the 3 channels fed in).
        width: FPN and mask-head channels (box head 4x); torchvision's 256.
        rois_per_image: proposals sampled per image to train the heads.
    """
    side = min_size or image_size
    rescale = min_size is not None or max_size is not None
    common = {
        "num_classes": num_categories + 1,
        "min_size": side,
        "max_size": max_size or max(side, 1333 * side // 800),
        "image_mean": _three(mean),
        "image_std": _three(std),
        "box_detections_per_img": detections,
        "box_score_thresh": score_threshold,
        "rpn_post_nms_top_n_train": rpn_post_nms_top_n,
        "rpn_post_nms_top_n_test": rpn_post_nms_top_n,
        "box_batch_size_per_image": rois_per_image,
    }
    model = _model(encoder, num_categories, side, common, width, anchor_size)
    if not rescale:
        model.transform = _NoResize(side, common["max_size"], common["image_mean"], common["image_std"])
    return model


class _NoResize(GeneralizedRCNNTransform):
    """torchvision's transform without its resize: normalises and pads to the stride, nothing else."""

    def resize(self, image, target=None):
        return image, target


def _model(encoder: str, num_categories: int, side: int, common: dict, width: int, anchor_size: int | None):
    if encoder == "resnet50":
        model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **common)  # all layers train
        model.rpn.anchor_generator = _anchors(side, 5, anchor_size)
        return model
    if encoder in ("resnet18", "resnet34"):
        body = getattr(resnet, encoder)(weights=None, norm_layer=nn.BatchNorm2d)
        backbone = BackboneWithFPN(
            body,
            {f"layer{k}": str(k - 1) for k in range(1, 5)},
            [64, 128, 256, 512],
            width,
            extra_blocks=LastLevelMaxPool(),
        )
        return MaskRCNN(
            backbone,
            rpn_anchor_generator=_anchors(side, 5, anchor_size),
            **(common | _heads(width, num_categories + 1)),
        )
    if encoder == "mobilenet_v3_large":
        features = mobilenet_v3_large(weights=None, norm_layer=nn.BatchNorm2d).features
        # The last two stages, as torchvision's FPN over MobileNetV3 returns them.
        stages = [0] + [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)] + [len(features) - 1]
        last = stages[-2:]
        backbone = BackboneWithFPN(
            features,
            {str(index): str(k) for k, index in enumerate(last)},
            [features[i].out_channels for i in last],
            width,
            extra_blocks=LastLevelMaxPool(),
        )
        # Two stages and a pooled level: three feature maps, each given all anchor sizes (torchvision's way).
        sizes = tuple(size for (size,) in anchor_sizes(side, 3, anchor_size))
        generator = AnchorGenerator((sizes,) * 3, (_RATIOS,) * 3)
        return MaskRCNN(backbone, rpn_anchor_generator=generator, **(common | _heads(width, num_categories + 1)))
    raise SegflowError(f"train.encoder: {encoder} is not a Mask R-CNN backbone here; use resnet18, resnet34, ...")


def _heads(width: int, num_classes: int) -> dict:
    """Box and mask heads ``width`` channels wide and their predictors (torchvision's at 256: a 1024-wide box head)."""
    return {
        "num_classes": None,  # given to the predictors instead
        "box_head": TwoMLPHead(width * 7 * 7, 4 * width),
        "box_predictor": FastRCNNPredictor(4 * width, num_classes),
        "mask_head": MaskRCNNHeads(width, [width] * 4, 1),
        "mask_predictor": MaskRCNNPredictor(width, width, num_classes),
    }


def _anchors(side: int, levels: int, smallest: int | None = None) -> AnchorGenerator:
    return AnchorGenerator(anchor_sizes(side, levels, smallest), (_RATIOS,) * levels)


def _three(values: list[float]) -> list[float]:
    return list(values) * 3 if len(values) == 1 else list(values)


def load_weights(model: MaskRCNN, path: str | Path) -> str:
    """Load a local torchvision weights file into ``model``: the whole model's, or its backbone's.

    Returns:
        What was loaded ("the whole model" or "the backbone (N tensors)").

    Raises:
        SegflowError: the file is missing, unreadable, or matches neither.
    """
    path = Path(path)
    if not path.is_file():
        raise SegflowError(
            f"train.encoder_weights: {path} not found; give a local .pth/.safetensors file (hub weights need "
            "network, which segflow does not use) or null for random init"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: one line, not a traceback
        raise SegflowError(f"train.encoder_weights: {path} cannot be read ({error})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    whole = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(whole) == len(own):
        model.load_state_dict(whole)
        return "the whole model"
    # A classification network's weights (resnet18.pth: conv1.weight, layer1.0...) into the FPN's body.
    body = {f"backbone.body.{k}": v for k, v in state.items()}
    matched = {k: v for k, v in body.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise SegflowError(
            f"train.encoder_weights: {path} holds no tensors of this Mask R-CNN or of its backbone; "
            "give torchvision weights of the same architecture"
        )
    model.load_state_dict(matched, strict=False)
    return f"the backbone ({len(matched)} tensors)"
