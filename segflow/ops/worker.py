"""``segflow worker``: a process worker for the deployment's pool, run in the project folder."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from segflow.ops.deploy import ensure_pool


def worker_command(pool: str) -> list[str]:
    return [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]


def worker(root: Path, api: str) -> int:
    """Run a process worker for the project's work pool, in the project folder, until interrupted."""
    from segflow.ops.env import stage_env
    from segflow.params import load_params

    pool = load_params(root / "params.yaml").schedule.work_pool
    ensure_pool(pool)
    proc = subprocess.Popen(worker_command(pool), cwd=root, env=stage_env(PREFECT_API_URL=api))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # SIGINT lets the worker end its runs cleanly (SIGTERM can leave it waiting on a gone server).
        proc.send_signal(signal.SIGINT)
        return proc.wait()
