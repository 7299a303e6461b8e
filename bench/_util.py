"""What benchmarks (and the integration tests) share: a scratch project, timed commands, machine facts."""

from __future__ import annotations

import copy
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from segflow.ops.env import machine, stage_env  # noqa: F401 (benchmarks take machine() from here)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

#: A tiny seeded configuration: 24 synthetic 32-px scenes, a narrow U-Net, one epoch on the CPU (the tests'
#: shared project and the benchmarks that need a real but quick run).
TINY = {
    "seed": 3,
    "ingest": {
        "workers": 1,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "synthetic": {"num_images": 24, "image_size": 32, "min_objects": 1, "max_objects": 3},
    },
    "augment": {"crop_size": 32, "preview_samples": 2},
    "train": {
        "arch": "Unet",
        "encoder": "resnet18",
        "encoder_depth": 3,
        "decoder_channels": [16, 8, 4],
        "epochs": 1,
        "batch_size": 4,
        "accelerator": "cpu",
    },
    "evaluate": {"preview_samples": 2},
}

# What a pipeline needs from the repository; its outputs and lock are not copied.
PROJECT_FILES = ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore", "data/raw/README.md")


def env(**extra: str) -> dict[str, str]:
    """A stage's environment (venv first on PATH, hub offline), without telemetry."""
    return stage_env(DVC_NO_ANALYTICS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)


def merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` laid over it, nested mappings merged key by key."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = merge(merged[key], value) if nested else value
    return merged


def fresh_project(dest: Path, params: dict | None = None) -> Path:
    """A committed git + DVC copy of this project's code and params, with no outputs.

    Args:
        params: overrides laid over this repository's params.yaml (e.g. a tiny configuration).
    """
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    # The library (its files are stage deps in dvc.yaml), the stages, and the flow a deployment runs.
    for package in ("segflow", "tasks", "flows"):
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / ".dvc").mkdir()
    for name in PROJECT_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    full = yaml.safe_load((ROOT / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(merge(full, params or {}), sort_keys=False))
    identity = {"GIT_AUTHOR_NAME": "segflow", "GIT_COMMITTER_NAME": "segflow"}
    identity |= {"GIT_AUTHOR_EMAIL": "segflow@segflow.invalid", "GIT_COMMITTER_EMAIL": "segflow@segflow.invalid"}
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "scratch"]):
        subprocess.run(cmd, cwd=dest, env=env(**identity), check=True, capture_output=True)
    return dest


def timed(cmd: list[str], cwd: Path, environ: dict[str, str] | None = None) -> tuple[float, str]:
    """Run ``cmd``; return (wall seconds, combined output). Fails loudly on a non-zero exit."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=environ or env(), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def median_time(cmd: list[str], cwd: Path, repeats: int, environ: dict[str, str] | None = None) -> tuple[float, str]:
    """Median wall seconds over ``repeats`` runs, and the last run's output."""
    times, output = [], ""
    for _ in range(repeats):
        seconds, output = timed(cmd, cwd, environ)
        times.append(seconds)
    return statistics.median(times), output
