"""Build, save and load segmentation models.

A saved model is a folder: ``model.safetensors`` (weights, no pickle),
``model.json`` (the card: everything needed to rebuild and use the model) and
``preprocess.json`` (the evaluation pipeline, saved with ``A.save``).
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import shutil
from pathlib import Path
from typing import Literal

import segmentation_models_pytorch as smp
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tasks import _archs, _export
from tasks._common import SegflowError, atomic_dir, sha256_file
from tasks.params import IGNORE_INDEX, Arch, TrainParams

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CARD = "model.json"
PREPROCESS = "preprocess.json"
CARD_FORMAT = "segflow-model/1"


class ModelCard(BaseModel):
    """What a saved model is and how to feed it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["segflow-model/1"] = CARD_FORMAT
    arch: Arch
    encoder: str
    encoder_depth: int
    decoder_channels: list[int] | None = None
    #: 1 (grayscale) or 3 (RGB), as the training data had.
    in_channels: int = 3
    classes: list[str]
    #: Images are uint8 with ``in_channels`` channels, scaled to 0-1, then normalised with mean/std (per channel).
    mean: list[float]
    std: list[float]
    #: augment.eval: pixel-level albumentations transforms (recipe steps) applied before normalisation.
    pixel_transforms: list[dict] = []
    #: Height and width must divide by this; pad (bottom/right) first, crop predictions back.
    pad_divisor: int
    #: The square crop size training saw.
    train_size: int
    ignore_index: int = IGNORE_INDEX
    weights: str = WEIGHTS
    #: sha256 of the weights file: loading refuses a file that was changed after training.
    weights_sha256: str | None = None
    preprocess: str = PREPROCESS
    #: Provenance: seed, epochs, best epoch and its validation score, ...
    training: dict = {}
    #: Exports written beside the weights, e.g. {"onnx": {"file", "sha256", "opset", "max_abs_logit_diff"}}.
    exports: dict = {}


def _weights_error(name: str) -> SegflowError:
    return SegflowError(
        f"train.encoder_weights='{name}' is neither a local file nor available offline (pretrained weights come "
        "from the Hugging Face hub, which this machine cannot reach); download the weights file elsewhere and "
        "set train.encoder_weights to its path, or set it to null for random initialisation"
    )


def create(
    arch: str,
    encoder: str,
    encoder_depth: int,
    decoder_channels: list[int] | None,
    num_classes: int,
    hub_weights: str | None = None,
    in_channels: int = 3,
):
    """``smp.create_model``, its failures turned into one-line errors.

    Args:
        hub_weights: a pretrained-weights name smp fetches from the model hub
            ("imagenet"); None for random initialisation.
        in_channels: image channels (1 for grayscale, 3 for RGB).

    Returns:
        torch.nn.Module mapping (N, in_channels, H, W) float32 to logits (N, num_classes, H, W).
    """
    if arch in _archs.EXTRA_ARCHS:  # FCN and SegNet: our own modules, same factory, card, save and load
        if decoder_channels is not None:
            raise SegflowError(f"train.decoder_channels: arch {arch} has no such option; set it to null")
        if hub_weights is not None:
            raise _weights_error(hub_weights)
        return _archs.build(arch, encoder, encoder_depth, num_classes, in_channels)
    kwargs = {"encoder_depth": encoder_depth, "in_channels": in_channels}
    accepted = inspect.signature(smp.MODEL_ARCHITECTURES_MAPPING[arch.lower()].__init__).parameters
    per_stage = takes_stage_widths(arch)
    if decoder_channels is None and per_stage:
        # smp's default widths are for depth 5 and fail at any other: keep the first (deepest) encoder_depth.
        kwargs["decoder_channels"] = list(accepted["decoder_channels"].default)[:encoder_depth]
    if decoder_channels is not None:
        # Several archs take **kwargs and would silently ignore an option they do not have.
        if "decoder_channels" not in accepted:
            raise SegflowError(f"train.decoder_channels: arch {arch} has no such option; set it to null")
        if not per_stage:
            raise SegflowError(
                f"train.decoder_channels: arch {arch} takes one decoder width, not one per stage; set it to null "
                "(smp's default)"
            )
        kwargs["decoder_channels"] = decoder_channels
    # smp's PSPNet and FPN upsample their decoder output by a fixed factor that only fits their default depth
    # (3 and 5): at any other depth the logits would be smaller or larger than the image.
    if arch.lower() == "pspnet":
        kwargs["upsampling"] = 2**encoder_depth
    elif arch.lower() == "fpn":
        kwargs["upsampling"] = 2 ** (encoder_depth - 3)
    try:
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=hub_weights, classes=num_classes, **kwargs)
    except KeyError as error:
        if hub_weights is not None and "Wrong pretrained weights" in str(error):
            # A name smp does not know for this encoder (a typo), not a network problem.
            raise SegflowError(
                f"train.encoder_weights: {str(error).strip(chr(34))}; or give a local weights file, or null"
            ) from None
        if hub_weights is not None and "weights" in str(error).lower():
            raise _weights_error(hub_weights) from None
        if "encoder" not in str(error).lower():
            raise
        close = difflib.get_close_matches(encoder, smp.encoders.get_encoder_names(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise SegflowError(
            f"train.encoder: unknown encoder '{encoder}'; {hint}"
            "see segmentation_models_pytorch.encoders.get_encoder_names(), or use 'tu-<timm model name>'"
        ) from None
    except RuntimeError as error:
        if "Unknown model" not in str(error):
            raise
        raise SegflowError(f"train.encoder: timm has no model '{encoder.removeprefix('tu-')}' ({error})") from None
    except (ValueError, AssertionError, TypeError) as error:
        raise SegflowError(f"train: cannot build {arch} with encoder {encoder}: {error}") from None
    except OSError:  # huggingface_hub's offline / not-found / connection errors all derive from OSError
        if hub_weights is None:
            raise
        raise _weights_error(hub_weights) from None


def takes_stage_widths(arch: str) -> bool:
    """Whether ``arch``'s decoder takes ``decoder_channels`` as one width per encoder stage (Unet-like)."""
    if arch in _archs.EXTRA_ARCHS:
        return False
    accepted = inspect.signature(smp.MODEL_ARCHITECTURES_MAPPING[arch.lower()].__init__).parameters
    return "decoder_channels" in accepted and accepted["decoder_channels"].annotation not in (int, "int")


def load_encoder_weights(model: torch.nn.Module, source: str, arch: str = "") -> None:
    """Load local pretrained weights into ``model.encoder`` (or the whole model).

    Accepts a safetensors file or a ``torch.save`` state dict (read with
    ``weights_only=True``), keyed either for the encoder alone or for a whole
    smp model (``encoder.*`` keys).

    Raises:
        SegflowError: the file is missing, unreadable, or matches no encoder key.
    """
    path = Path(source).expanduser()
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except (OSError, RuntimeError, SafetensorError, ValueError) as error:
        raise SegflowError(f"{path}: cannot read weights ({error}); give a .safetensors or .pth state dict") from None
    if not isinstance(state, dict):
        raise SegflowError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    if arch in _archs.EXTRA_ARCHS:  # torchvision checkpoints (fcn_resnet*, resnet*, vgg*_bn) map onto the encoder
        state = _archs.adapt_state_dict(arch, state)
    elif any(k.startswith("encoder.") for k in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    own = model.encoder.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise SegflowError(
            f"{path}: none of its {len(state)} tensors fit encoder '{type(model.encoder).__name__}'; "
            "is it the weights of the same train.encoder?"
        )
    model.encoder.load_state_dict(usable, strict=False)
    if len(usable) < len(own):
        # Most likely the weights of another encoder variant: say so, loudly, but train on.
        mismatched = sum(1 for k, v in state.items() if k in own and own[k].shape != v.shape)
        log.warning(
            "%s: only %d of the encoder's %d tensors loaded (%d shape mismatches, %d missing); "
            "the rest stay randomly initialised. Is it the weights of train.encoder?",
            path,
            len(usable),
            len(own),
            mismatched,
            len(own) - len(usable) - mismatched,
        )
    else:
        log.info("loaded all %d encoder tensors from %s", len(own), path)


def build(params: TrainParams, num_classes: int, in_channels: int = 3) -> torch.nn.Module:
    """The model ``params`` describe: random init, local weights, or a hub name smp knows.

    A hub name only works where the hub is reachable or its files are already
    cached (``HF_HUB_OFFLINE=1`` makes an offline machine fail at once instead of waiting).
    """
    weights = params.encoder_weights
    local = weights is not None and Path(weights).expanduser().is_file()
    looks_like_path = weights is not None and (
        "/" in weights or Path(weights).suffix in (".pth", ".pt", ".safetensors")
    )
    if weights is not None and not local and looks_like_path:
        raise SegflowError(f"train.encoder_weights: {weights} does not exist; fix the path or set it to null")
    model = create(
        params.arch,
        params.encoder,
        params.encoder_depth,
        params.decoder_channels,
        num_classes,
        hub_weights=None if local else weights,
        in_channels=in_channels,
    )
    if local:
        load_encoder_weights(model, weights, params.arch)
    return model


def save(
    model: torch.nn.Module, card: ModelCard, preprocess: Path, out: Path, export: list[str] | tuple[str, ...] = ()
) -> ModelCard:
    """Write weights, card, preprocessing (and ``export`` formats) into ``out`` atomically (all or nothing).

    Returns:
        The card as written (with the weights' and exports' hashes).

    Raises:
        SegflowError: an export disagrees with PyTorch beyond :data:`tasks._export.TOLERANCE`.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(out) as tmp:
        # One metadata key only: safetensors writes several in a random order, which
        # would give the same weights a new hash (and DVC a new output) on every run.
        save_file(state, tmp / card.weights, metadata={"format": "pt"})
        exports = {name: _export.export(name, model, card, tmp) for name in export}
        card = card.model_copy(update={"weights_sha256": sha256_file(tmp / card.weights), "exports": exports})
        shutil.copyfile(preprocess, tmp / card.preprocess)
        (tmp / CARD).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return card


def read_card(model_dir: Path) -> ModelCard:
    """Read and check ``model.json``.

    Raises:
        SegflowError: missing or not a segflow model card.
    """
    path = Path(model_dir) / CARD
    if not path.is_file():
        raise SegflowError(f"{path}: not found; train a model first (dvc repro train)")
    try:
        return ModelCard.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError) as error:
        detail = " ".join(str(error).split())
        raise SegflowError(f"{path}: not a {CARD_FORMAT} card ({detail})") from None


def verify(model_dir: Path, card: ModelCard, name: str | None = None) -> Path:
    """The path of the weights (or of export ``name``), checked against the card's sha256.

    Raises:
        SegflowError: the file is missing or was changed after training.
    """
    model_dir = Path(model_dir)
    if name is None:
        path, expected = model_dir / card.weights, card.weights_sha256
    elif name in card.exports:
        path, expected = model_dir / card.exports[name]["file"], card.exports[name]["sha256"]
    else:
        raise SegflowError(
            f"{model_dir / CARD}: this model has no {name} export; retrain with register.export: [{name}]"
        )
    if not path.is_file():
        raise SegflowError(f"{path}: not found; fetch the model again")
    if expected is not None and sha256_file(path) != expected:
        raise SegflowError(
            f"{path}: its sha256 does not match {model_dir / CARD} (the file was changed after training); "
            "refusing to load it: fetch the model again (segflow predict fetches it from the registry)"
        )
    return path


def load(model_dir: Path) -> tuple[torch.nn.Module, ModelCard]:
    """Rebuild a saved model with its verified weights, in eval mode on the CPU (no unpickling anywhere)."""
    card = read_card(model_dir)
    weights = verify(model_dir, card)
    model = create(
        card.arch,
        card.encoder,
        card.encoder_depth,
        card.decoder_channels,
        len(card.classes),
        in_channels=card.in_channels,
    )
    try:
        model.load_state_dict(load_file(weights), strict=True)
    except (OSError, SafetensorError, RuntimeError) as error:
        detail = " ".join(str(error).split())[:300]
        raise SegflowError(f"{weights}: does not match {Path(model_dir) / CARD} ({detail}); retrain") from None
    return model.eval(), card


def size(model: torch.nn.Module, channels: int, size: int) -> dict[str, float]:
    """Parameter count and multiply-accumulates of one forward pass on a ``size`` x ``size`` image.

    MACs are counted by ``torch.utils.flop_counter`` (convolutions and matrix products; one MAC is two
    FLOPs); pooling, normalisation and activations are not in it.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    with torch.no_grad(), counter:
        model(torch.zeros(1, channels, size, size, device=device_of(model)))
    model.train(was_training)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "gmacs": round(counter.get_total_flops() / 2e9, 4),
        "macs_size": size,
    }


def device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
