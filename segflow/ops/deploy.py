"""``segflow deploy``: the ``retrain`` deployment of the pipeline flow.

On a ``process`` work pool, with a cron schedule, at most one run at a time, created or updated in
place. Its entrypoint is ``flows/pipeline.py:pipeline``, loaded from the project root by the worker.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

DEPLOYMENT = "retrain"
FLOW_NAME = "segflow-pipeline"
ENTRYPOINT = "flows/pipeline.py:pipeline"


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

    from segflow.ops.pipeline import ensure_gpu_limit
    from segflow.params import load_params

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
