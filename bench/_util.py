"""What benchmarks share: a scratch copy of the project, timed commands, machine facts."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# What a pipeline needs from the repository; its outputs and lock are not copied.
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore")


def env(**extra: str) -> dict[str, str]:
    """This environment, offline and quiet, with this interpreter's bin first on PATH."""
    out = dict(os.environ)
    out.update(HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    out["PATH"] = os.pathsep.join([str(BIN), out.get("PATH", "")])
    out.update(extra)
    return out


def fresh_project(dest: Path) -> Path:
    """A committed git + DVC copy of this project's code and params, with no outputs."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(ROOT / "tasks", dest / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / ".dvc").mkdir()
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, dest / name)
    git_env = env(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@segflow.invalid")
    git_env.update(GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@segflow.invalid")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, env=git_env, check=True)
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
