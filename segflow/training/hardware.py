"""Where training runs: accelerator checks, precision, DDP strategy and what DDP processes must agree on."""

from __future__ import annotations

import hashlib
import logging

import lightning as L
import torch

from segflow.errors import SegflowError
from segflow.params import TrainParams

log = logging.getLogger(__name__)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def has_unused_parameters(model: torch.nn.Module, channels: int, size: int) -> bool:
    """Whether some parameters take no part in the output (an encoder cut short by ``encoder_depth``).

    DDP must then be told to look for them each step (a little slower), or it fails at the first step.
    """
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(2, channels, size, size)).float().sum().backward()
        unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
    finally:
        for p in model.parameters():
            p.grad = None
        model.train(was_training)
    return unused


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict's names and bytes (what the ranks of a DDP run compare)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX): there, bf16 mixed precision trains a
    Unet about 2.3x faster than fp32 (docs/benchmarks.md); elsewhere torch emulates it, slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16 mixed precision on GPUs that have it, fp16 mixed on older ones, fp32 on CPU.

    fp32 stays the CPU default (results comparable across CPUs with and without bf16); bf16-mixed on a CPU is
    a choice (the ISBI and CamVid recipes make it), with a warning where the CPU has to emulate it.
    """
    if precision != "auto":
        if precision.startswith("bf16") and not on_gpu(accelerator) and not cpu_has_native_bf16():
            log.warning(
                "train.precision is %s on a CPU without native bf16 (no AVX512-BF16 or AMX): torch emulates it, "
                "which trains slower than fp32; set train.precision: auto (fp32 on the CPU)",
                precision,
            )
        return precision
    if accelerator != "cpu" and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def check_accelerator(accelerator: str) -> None:
    """``gpu`` needs a GPU torch can use.

    Raises:
        SegflowError: there is none.
    """
    if accelerator == "gpu" and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        raise SegflowError(
            "train.accelerator is gpu, but torch finds no usable GPU on this machine (no CUDA device); "
            "set train.accelerator: auto (a GPU when there is one, else the CPU) or cpu"
        )


def on_gpu(accelerator: str) -> bool:
    """Whether training will run on a CUDA GPU (``auto`` picks one when there is one)."""
    return accelerator != "cpu" and torch.cuda.is_available()


def _strategy(
    cfg: TrainParams, model: torch.nn.Module, channels: int, stride: int
) -> str | L.pytorch.strategies.Strategy:
    """The Lightning strategy: ``ddp`` told about unused parameters when the model has some."""
    if cfg.strategy != "ddp":
        return cfg.strategy
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(find_unused_parameters=has_unused_parameters(model, channels, 2 * stride))
