"""The Prefect flow that runs the DVC pipeline, one Prefect task per DVC stage.

The stage list and order come from DVC itself (the graph of ``dvc.yaml``), and
each stage runs as ``dvc repro --single-item <stage>``: a flow run and
``dvc repro`` share one cache, skip the same unchanged stages and leave the
same ``dvc.lock``. The flow asks DVC once, in-process, which stages are stale
and starts DVC only for those, so a run where nothing changed costs about
what ``dvc repro`` costs. Prefect adds logs, retries, a run history,
artifacts (summary with provenance, metrics, curves, data report) and
schedules (see :mod:`segflow.ops.deploy`).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.states import Cancelled, Failed

from segflow.errors import SegflowError
from segflow.ops import summary
from segflow.ops.env import stage_env
from segflow.ops.lock import Busy, clear_stale_dvc_locks, project_lock
from segflow.ops.plan import changed_sources, dvc, has_remote, stage_order, stages_to_run
from segflow.ops.runner import StageFailed, run_stage
from segflow.ops.slots import GPU_LIMIT
from segflow.params import load_params
from segflow.registry import provenance

__all__ = ["StageFailed", "pipeline", "stage_env", "stage_order"]

# Prefect validates flow parameters with a pydantic model built per call; the parameter
# ``register`` shadows BaseModel.register there, harmlessly (the value is read by name).
warnings.filterwarnings("ignore", message='Field name "register" in "PipelineModel" shadows', category=UserWarning)


def ensure_gpu_limit(slots: int = 1) -> None:
    """Create the global concurrency limit GPU stages take a slot of, unless it exists (then it is kept,
    so a machine with more GPUs can raise it: ``prefect gcl update gpu --limit 2``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))


def _remote(root: Path, command: str, logger) -> None:
    code, output = dvc(root, command)
    for line in output.splitlines():
        if line.strip():
            (logger.info if code == 0 else logger.warning)("dvc %s: %s", command, line)


@task(name="register", task_run_name="register")
def register_model(root: str, commit: bool | None):
    """Register the trained model (GTO version, model card, champion/challenger gate); publish the outcome."""
    from prefect.artifacts import create_markdown_artifact

    from segflow.registry import register

    logger = get_run_logger()
    try:
        outcome = register.register(root, commit)
    except SegflowError as error:
        logger.error("%s", error)
        return Failed(message=f"register: {error}")
    for note in [*outcome.get("completed", []), *outcome.get("warnings", [])]:
        logger.warning("%s", note)
    line = register.summary_line(outcome)
    logger.info("%s", line)
    rows = "\n".join(f"| {k} | `{v}` |" for k, v in outcome.items())
    if outcome.get("tag"):  # a code span, not a mail link
        line = line.replace(outcome["tag"], f"`{outcome['tag']}`")
    create_markdown_artifact(
        key="segflow-registration",
        markdown=f"# Registration\n\n**{line}**\n\n| field | value |\n|---|---|\n{rows}\n",
        description="Model registration and the champion/challenger gate",
    )
    return outcome


def _end_with_the_worker() -> None:
    """In a deployment's run (started by a worker), end the run when that worker dies (segflow/ops/orphan.py)."""
    from prefect.runtime import deployment, flow_run
    from prefect.settings import PREFECT_API_URL

    from segflow.ops.orphan import watch_worker

    if deployment.id and flow_run.id:
        watch_worker(str(flow_run.id), PREFECT_API_URL.value())


@flow(name="segflow-pipeline")
def pipeline(
    root: str = ".",
    force: bool = False,
    stages: list[str] | None = None,
    retries: int = 1,
    register: bool = False,
    commit: bool | None = None,
):
    """Run the DVC stages of the project at ``root`` in dependency order.

    Run controls only (hyperparameters live in params.yaml, where DVC sees them):

    Args:
        root: the DVC project (the folder holding dvc.yaml and params.yaml).
        force: rerun stages even when nothing changed (``dvc repro --force``).
        stages: only these stages and what they depend on (default: all).
        retries: retries per stage, for failures that can change (a killed process, a busy lock);
            bad data or params fail at once.
        register: after the stages, register the model (GTO version, card, champion/challenger gate).
        commit: commit dvc.lock, params and metrics before registering (default: register.commit).

    Returns:
        ``{"stages": [...], "outputs": {...}, "metrics": ..., "provenance": ..., "change": ...}``, or a
        Failed state whose message is the failing stage's one-line error.
    """
    logger = get_run_logger()
    _end_with_the_worker()
    root_path = Path(root).resolve()
    results, failure, before, registration = [], None, None, None
    try:
        load_params(root_path / "params.yaml")  # every stage's params, before DVC deletes any output
        before = summary.read_metrics(root_path)
        with project_lock(root_path):
            # One push per run: a registration pushes before it tags (the remote must hold what a tag names).
            results, failure = _run_stages(root_path, force, stages, retries, logger, push=not register)
            if register and not failure:
                state = register_model(str(root_path), commit, return_state=True)
                failure = state.message if state.is_failed() else None
                registration = None if failure else state.result()
            if register and not (registration or {}).get("registered") and _ran(results) and has_remote(root_path):
                _remote(root_path, "push", logger)
    except Busy as busy:
        # Another pipeline holds the project (a second worker on one clone, a run by hand): nothing was
        # done and nothing is wrong with the project, so the run is Cancelled (named Busy), not Failed.
        message = f"{busy}; this run did nothing (one worker per clone: README, Team)"
        logger.warning("%s", message)
        return Cancelled(message=message, name="Busy")
    except (SegflowError, ValueError) as error:
        failure = str(error)
    result = {"root": root_path, **(summary.outputs(root_path) if results else {}), "stages": results}
    result["provenance"] = provenance.provenance(root_path) if results else {}
    result["change"] = summary.metric_change(before, result.get("metrics"))
    result["registration"] = registration
    if result["provenance"]:
        first = summary.publish(results, result, failure)
        if not failure:
            logger.info("%s", first)
    else:
        summary.publish_failure(failure)
    if failure:
        logger.error("%s", failure)
        return Failed(message=failure)
    return {k: v for k, v in result.items() if k != "root"}


def _ran(results: list[dict]) -> bool:
    return any(r["status"] == "ran" for r in results)


def _run_stages(
    root: Path, force: bool, targets: list[str] | None, retries: int, logger, push: bool = True
) -> tuple[list, str | None]:
    if cleared := clear_stale_dvc_locks(root):
        logger.debug("cleared %d entries of killed processes from .dvc/tmp/rwlock", cleared)
    remote = has_remote(root)
    if remote:
        _remote(root, "pull", logger)
    order, stale = stages_to_run(root, force, targets)
    for source in changed_sources(root) if stale else []:
        # What `dvc repro` does first: record the data's new version (the old one stays in DVC's cache).
        code, output = dvc(root, "commit", "--force", "--quiet", source)
        if code != 0:
            return [], f"dvc commit {source} failed: {output.splitlines()[-1] if output else code}"
        logger.info("%s: the data changed; its new version is recorded (commit the .dvc file with git)", source)
    logger.info(
        "stages from dvc.yaml: %s; to run: %s", " -> ".join(order), ", ".join(s for s in order if s in stale) or "none"
    )
    if stale & {"train"}:
        ensure_gpu_limit()
    task = run_stage.with_options(retries=retries, retry_delay_seconds=[5, 30, 120][: max(retries, 0)] or 0)
    results, failure = [], None
    for stage in order:
        if failure:
            results.append({"stage": stage, "status": "not run", "seconds": 0.0})
            continue
        state = task(stage, str(root), force, planned=stage in stale, return_state=True)
        if state.is_failed():
            failure = state.message
            results.append({"stage": stage, "status": "failed", "seconds": 0.0, "note": state.message})
        else:
            results.append(state.result())
    if push and remote and not failure and _ran(results):
        _remote(root, "push", logger)
    return results, failure
