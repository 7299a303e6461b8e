"""The environment segflow gives the processes it starts."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path


def stage_env(**extra: str) -> dict[str, str]:
    """The environment for a stage: this interpreter's bin folder first on PATH, hub offline.

    dvc.yaml commands say ``python -m tasks.x``; without the PATH entry a flow
    started as ``.venv/bin/segflow`` from an unactivated shell would run the
    stages with whatever ``python`` the shell finds. ``HF_HUB_OFFLINE`` defaults
    to 1 so a hub weights name fails at once rather than waiting on a network
    segflow does not use (set it to 0 where the hub is reachable).
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(extra)
    return env


def machine() -> str:
    """One line on where the figures were taken."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {platform.system()} {platform.release()}"
    )
