"""What a model costs: parameters and multiply-accumulates at a given input size, and its device."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


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
