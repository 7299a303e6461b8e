"""``segflow deploy``: the ``retrain`` deployment of the pipeline flow.

On a ``process`` work pool, with a cron schedule, at most one run at a time, created or updated in
place. Its entrypoint is ``flows/pipeline.py:pipeline``, loaded from the project root by the worker.

A run whose machine died (power, the OOM killer, a lost node: nothing of it left to say so) would stay
RUNNING forever. ``segflow worker`` makes its flow runs send a heartbeat every :data:`HEARTBEAT_S`
seconds, and ``segflow deploy`` creates the automation that marks a run CRASHED once
:data:`MISSED_HEARTBEATS` of them are missed (Prefect's own zombie detection, which the server
evaluates; nothing runs on the dead machine). A worker killed alone does better: its leash stops its
runs at once (:mod:`segflow.ops.worker`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

DEPLOYMENT = "retrain"
FLOW_NAME = "segflow-pipeline"
ENTRYPOINT = "flows/pipeline.py:pipeline"
#: Seconds between a flow run's heartbeats (Prefect's minimum; its default is 180).
HEARTBEAT_S = 30
#: Heartbeats missed before the run is marked CRASHED: the window is HEARTBEAT_S * MISSED_HEARTBEATS.
MISSED_HEARTBEATS = 3
ZOMBIE_AUTOMATION = "segflow: crash runs whose heartbeat stopped"


def heartbeat_env() -> dict[str, str]:
    """The flow runs' heartbeat setting, for the worker's environment (a value the user set is kept)."""
    import os

    key = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
    return {key: os.environ.get(key) or str(HEARTBEAT_S)}


def ensure_zombie_automation(heartbeat_s: int = HEARTBEAT_S, missed: int = MISSED_HEARTBEATS) -> str:
    """Create (or update in place) the automation that marks silent RUNNING flow runs CRASHED; return its id.

    It fires for each flow run that sent a heartbeat and then, within ``heartbeat_s * missed`` seconds, sent
    neither another heartbeat nor a final state.
    """
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    window = heartbeat_s * missed
    finals = {f"prefect.flow-run.{name}" for name in ("Completed", "Failed", "Cancelled", "Crashed")}
    wanted = Automation(
        name=ZOMBIE_AUTOMATION,
        description=f"A flow run silent for {window} s ({missed} heartbeats of {heartbeat_s} s) lost its machine.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *finals},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=window),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {window} s: the worker's machine stopped (segflow deploy's automation)",
            )
        ],
    )
    try:
        found = Automation.read(name=ZOMBIE_AUTOMATION)
    except ValueError:
        return str(wanted.create().id)
    wanted.id = found.id
    wanted.update()
    return str(found.id)


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
        ``{"id", "name", "work_pool", "cron", "timezone", "zombie_automation", "crash_after_s"}``.
    """
    from prefect import flow
    from prefect.schedules import Cron

    from segflow.ops.pipeline import ensure_gpu_limit
    from segflow.params import load_params

    settings = load_params(root / "params.yaml").schedule
    cron = cron or settings.cron
    ensure_pool(settings.work_pool)
    ensure_gpu_limit()
    automation = ensure_zombie_automation()
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
        "zombie_automation": automation,
        "crash_after_s": HEARTBEAT_S * MISSED_HEARTBEATS,
    }
