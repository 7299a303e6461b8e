"""Operating segflow with Prefect: a local server, the ``retrain`` deployment, a worker.

Each function here is what one ``segflow`` command does (the CLI only parses
and prints); tests call them directly.

- :func:`serve`: ``prefect server start`` on 127.0.0.1 with what this stack
  needs (no telemetry, the UI told the right API port, the project's own
  PREFECT_HOME), recorded in ``.segflow/prefect/server.json`` so the other
  commands find it without ``PREFECT_API_URL``.
- :func:`deploy`: the deployment ``retrain`` of the pipeline flow on a
  ``process`` work pool, with a cron schedule, at most one run at a time,
  created or updated in place.
- :func:`worker`: a process worker for that pool, run in the project folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tasks._common import SegflowError
from tasks._guard import STATE_DIR, is_alive, process_identity

DEPLOYMENT = "retrain"
FLOW_NAME = "segflow-pipeline"
ENTRYPOINT = "flows/pipeline.py:pipeline"


def prefect_home(root: Path) -> Path:
    """The Prefect home segflow uses: ``PREFECT_HOME`` when set, else the project's ``.segflow/prefect``."""
    return Path(os.environ.get("PREFECT_HOME") or Path(root) / STATE_DIR / "prefect")


def _server_file(root: Path) -> Path:
    return prefect_home(root) / "server.json"


def find_api(root: Path) -> str | None:
    """The Prefect API to use: ``PREFECT_API_URL``, else the project's running ``segflow server``."""
    from flows.server import healthy

    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    with contextlib.suppress(OSError, ValueError, KeyError):
        info = json.loads(_server_file(root).read_text())
        if is_alive(info["process"]) and healthy(info["api"]):
            return info["api"]
    return None


def require_api(root: Path) -> str:
    """:func:`find_api`, or a one-line error saying how to get a server.

    Raises:
        SegflowError: no server.
    """
    api = find_api(root)
    if api is None:
        raise SegflowError(
            "no Prefect server: start one with `segflow server` (in another terminal) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api, or point PREFECT_API_URL at your team's server"
        )
    return api


def serve(root: Path, port: int = 4200, announce=print) -> int:
    """Run a Prefect server (API and dashboard) on 127.0.0.1:``port`` until interrupted; return its status."""
    from flows.server import healthy, server_command, server_env

    home = prefect_home(root)
    home.mkdir(parents=True, exist_ok=True)
    api = f"http://127.0.0.1:{port}/api"
    if healthy(api):
        raise SegflowError(f"a Prefect server already answers on port {port}; use it (export PREFECT_API_URL={api})")
    server = subprocess.Popen(server_command(port), env=server_env(home, port, ui=True), cwd=root)
    _server_file(root).write_text(json.dumps({"api": api, "process": process_identity(server.pid)}))
    announce(
        f"segflow: Prefect server for {root} (database in {home})\n"
        f"  dashboard:  http://127.0.0.1:{port}\n"
        f"  in other terminals: export PREFECT_API_URL={api}\n"
        f"  (segflow run / deploy / worker in this project find it without that)\n"
        f"  stop it with Ctrl-C"
    )
    try:
        return server.wait()
    except KeyboardInterrupt:
        server.send_signal(signal.SIGINT)
        return server.wait()
    finally:
        _server_file(root).unlink(missing_ok=True)


def ensure_pool(name: str) -> None:
    """Create the ``process`` work pool ``name`` unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def deploy(root: Path, cron: str | None = None) -> dict:
    """Create or update the ``retrain`` deployment of the pipeline (schedule and pool from params.yaml).

    Args:
        cron: a schedule that overrides ``schedule.cron``.

    Returns:
        ``{"id", "name", "work_pool", "cron", "timezone"}``.
    """
    from prefect import flow
    from prefect.schedules import Cron

    from flows.pipeline import ensure_gpu_limit
    from tasks.params import load_params

    settings = load_params(root / "params.yaml").schedule
    cron = cron or settings.cron
    ensure_pool(settings.work_pool)
    ensure_gpu_limit()
    pipeline = flow.from_source(source=str(root), entrypoint=ENTRYPOINT)
    deployment_id = pipeline.deploy(
        name=DEPLOYMENT,
        work_pool_name=settings.work_pool,
        schedules=[Cron(cron, timezone=settings.timezone)],
        concurrency_limit=1,
        # Run controls only: hyperparameters live in params.yaml, where DVC sees them.
        # Scheduled retraining registers what it trains and commits its results (there is nobody to do it by hand).
        parameters={"root": str(root), "force": False, "stages": None, "retries": 1, "register": True, "commit": True},
        description="Scheduled retraining: reruns the stages whose data, params or code changed.",
        tags=["segflow"],
        print_next_steps=False,
        ignore_warnings=True,
    )
    return {
        "id": str(deployment_id),
        "name": f"{FLOW_NAME}/{DEPLOYMENT}",
        "work_pool": settings.work_pool,
        "cron": cron,
        "timezone": settings.timezone,
    }


def worker_command(pool: str) -> list[str]:
    return [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]


def worker(root: Path, api: str) -> int:
    """Run a process worker for the project's work pool, in the project folder, until interrupted."""
    from flows._env import stage_env
    from tasks.params import load_params

    pool = load_params(root / "params.yaml").schedule.work_pool
    ensure_pool(pool)
    proc = subprocess.Popen(worker_command(pool), cwd=root, env=stage_env(PREFECT_API_URL=api))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # SIGINT lets the worker end its runs cleanly (SIGTERM can leave it waiting on a gone server).
        proc.send_signal(signal.SIGINT)
        return proc.wait()
