"""Build a segmentation model from its description: any smp architecture and encoder, FCN or SegNet.

One call, ``smp.create_model``, for smp's architectures (with the fixes that keep logits the size
of the image at every encoder depth); FCN and SegNet come from :mod:`segflow.semantic.archs`.
Encoder weights: random by default, or a local file; a hub name fails with one line offline.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from segflow.errors import SegflowError
from segflow.params import TrainParams
from segflow.semantic import archs

log = logging.getLogger(__name__)


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
    if arch in archs.EXTRA_ARCHS:  # FCN and SegNet: our own modules, same factory, card, save and load
        if decoder_channels is not None:
            raise SegflowError(f"train.decoder_channels: arch {arch} has no such option; set it to null")
        if hub_weights is not None:
            raise _weights_error(hub_weights)
        return archs.build(arch, encoder, encoder_depth, num_classes, in_channels)
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
    if arch in archs.EXTRA_ARCHS:
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
    if arch in archs.EXTRA_ARCHS:  # torchvision checkpoints (fcn_resnet*, resnet*, vgg*_bn) map onto the encoder
        state = archs.adapt_state_dict(arch, state)
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
