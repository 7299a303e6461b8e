"""The Prefect flow that runs the DVC pipeline, one Prefect task per DVC stage.

The stage list and order come from DVC itself (the graph of ``dvc.yaml``), and
each stage runs as ``dvc repro --single-item <stage>``: a flow run and
``dvc repro`` share one cache, skip the same unchanged stages and leave the
same ``dvc.lock``. Prefect adds logs, retries, a run history, artifacts (the
test metrics) and schedules.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows._leash import stop_group
from flows._lock import project_lock
from tasks._files import LIVE_DIR, METRICS, MODEL_DIR, PREDICTIONS, REPORT_MD
from tasks._guard import PARENT_ENV, process_identity, restore
from tasks.params import load_params


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message carries its own last error line."""


def stage_order(root: Path | str = ".") -> list[str]:
    """The pipeline stages of the DVC project at ``root``, dependencies first.

    Uses DVC's own planner over the ``dvc.yaml`` graph, so this order is the
    one ``dvc repro`` would take. Data tracked by ``.dvc`` files has no command
    and is left out.
    """
    from dvc.repo import Repo
    from dvc.repo.reproduce import plan_repro

    with Repo(str(root)) as repo:
        return [stage.addressing for stage in plan_repro(repo.index.graph) if stage.cmd]


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


def _stop(proc: subprocess.Popen) -> None:
    """Stop a stage and everything it started, and wait until all of it is gone.

    The stage runs in its own session (DVC starts its command through a shell); SIGTERM lets it put back
    its last good outputs (tasks/_guard.py) before it exits, SIGKILL follows for what is left after 30 s.
    """
    stop_group(proc.pid, grace=30)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _failure_reason(stage: str, lines: deque[str], code: int) -> str:
    """The most useful line of a failed stage's output: its own one-line error if it printed one.

    DVC's "is busy" error names the blocking processes on the lines after it: they join it on one line.
    """
    lines = list(lines)
    for prefix in ("segflow ", "ERROR"):
        found = [i for i, line in enumerate(lines) if line.startswith(prefix)]
        if found:
            line = lines[found[-1]]
            if "is busy, it is being blocked by:" in line:
                blockers = [b.strip() for b in lines[found[-1] + 1 :] if b.strip().startswith("(PID")]
                line = f"{line} {'; '.join(blockers)} (wait for it to finish, or stop it)"
            return f"stage '{stage}' failed: {line}"
    return f"stage '{stage}' failed with exit code {code}: {lines[-1] if lines else 'no output'}"


def _stage_command(stage: str, force: bool) -> list[str]:
    """``dvc repro --single-item <stage>``, on a leash: it stops if this process dies (flows/_leash.py)."""
    dvc = [sys.executable, "-m", "dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    return [sys.executable, "-m", "flows._leash", process_identity(), "--", *dvc]


def _stage_run_env() -> dict[str, str]:
    """The stage's environment: who owns it (the stage watches that process) and which flow run it serves."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_URL

    extra = {PARENT_ENV: process_identity()}
    if flow_run.id and PREFECT_API_URL.value():
        extra |= {"SEGFLOW_FLOW_RUN": str(flow_run.id), "PREFECT_API_URL": PREFECT_API_URL.value()}
    return stage_env(**extra)


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(stage: str, root: str, force: bool = False) -> dict:
    """Run one DVC stage (``dvc repro --single-item``), streaming its output into the run's log.

    Interrupted (Ctrl-C, SIGTERM, a Prefect cancel), it stops the stage and everything under it before
    it returns; a failed or stopped stage leaves the outputs of its last successful run in place.

    Returns:
        ``{"stage", "status": "ran" | "skipped", "seconds"}``.

    Raises:
        StageFailed: the stage (or DVC) exited non-zero.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    ran = False
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        _stage_command(stage, force),
        cwd=root,
        env=_stage_run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,  # its own process group: a terminal's Ctrl-C reaches segflow, which stops it
    ) as proc:
        try:
            for raw in proc.stdout:
                line = raw.rstrip()
                if not line:
                    continue
                tail.append(line)
                ran = ran or line.startswith("Running stage")
                logger.info("%s", line)
            code = proc.wait()
        except BaseException:
            _stop(proc)
            # Everything that wrote to the pipe is gone now: log what it said on its way out.
            for line in proc.stdout.read().splitlines():
                if line.strip():
                    logger.info("%s", line.rstrip())
            # The stage restores its own outputs when stopped; this covers a stop before it started.
            restore(stage, Path(root))
            raise
    if code != 0:
        restore(stage, Path(root))
        raise StageFailed(_failure_reason(stage, tail, code))
    result = {"stage": stage, "status": "ran" if ran else "skipped", "seconds": round(time.perf_counter() - started, 1)}
    logger.info("stage %s %s in %.1fs", stage, result["status"], result["seconds"])
    return result


def collect_outputs(root: Path) -> dict:
    """Where the pipeline's results are, and the headline test metrics if evaluate has run."""
    params = load_params(root / "params.yaml")
    paths = params.paths
    outputs = {
        "metrics": str(paths.evaluate / METRICS),
        "training_metrics": str(paths.train / LIVE_DIR / "metrics.json"),
        "predictions": str(paths.evaluate / PREDICTIONS),
        "model": str(paths.train / MODEL_DIR),
        "data_report": str(paths.ingest / REPORT_MD),
    }
    metrics_file = root / paths.evaluate / METRICS
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    report_file = root / paths.ingest / REPORT_MD
    report = report_file.read_text(encoding="utf-8") if report_file.is_file() else None
    return {"outputs": outputs, "metrics": metrics, "data_report": report}


def headline(metrics: dict) -> str:
    """The test scores in one line: macro IoU and Dice, per-class IoU."""
    iou, dice = metrics["iou"], metrics["dice"]
    scored = {name: value for name, value in iou["per_class"].items() if value is not None}
    per_class = ", ".join(f"{name} {value:.3f}" for name, value in scored.items())
    return (
        f"test IoU (macro over {len(scored)} classes) {iou['macro']:.4f}, Dice (macro) {dice['macro']:.4f} "
        f"on {metrics['images']} images; IoU per class: {per_class}"
    )


def _publish(stages: list[dict], outputs: dict) -> None:
    """Show the run's stages and test metrics as Prefect artifacts (dashboard, Artifacts tab)."""
    metrics = outputs["metrics"]
    lines = ["# segflow pipeline", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} |" for s in stages]
    if metrics:
        iou, dice = metrics["iou"], metrics["dice"]
        lines += ["", f"**{headline(metrics)}**", "", f"Reduction: {metrics['reduction']}"]
        create_table_artifact(
            key="segflow-test-metrics",
            table=[
                {"class": name, "iou": iou["per_class"][name], "dice": dice["per_class"][name]}
                for name in iou["per_class"]
            ],
            description="Per-class IoU and Dice on the test split (pixel counts summed over images).",
        )
    lines += ["", *[f"- {name}: `{path}`" for name, path in outputs["outputs"].items()]]
    create_markdown_artifact(key="segflow-pipeline-summary", markdown="\n".join(lines), description="segflow run")
    if outputs["data_report"]:
        create_markdown_artifact(
            key="segflow-data-report",
            markdown=outputs["data_report"],
            description="What ingest read: images per split, class shares, sizes, problems found",
        )


@flow(name="segflow-pipeline")
def pipeline(root: str = ".", force: bool = False, retries: int = 0) -> dict:
    """Run every DVC stage of the project at ``root`` in dependency order.

    Args:
        root: the DVC project (the folder holding dvc.yaml and params.yaml).
        force: rerun stages even when DVC sees no change (``dvc repro --force``).
        retries: Prefect retries per stage (for flaky infrastructure, not bad data).

    Returns:
        ``{"stages": [...], "outputs": {...}, "metrics": {...} | None}``.
    """
    logger = get_run_logger()
    root_path = Path(root).resolve()
    # Pre-flight: every stage's params are checked before DVC deletes any output.
    load_params(root_path / "params.yaml")
    with project_lock(root_path):
        order = stage_order(root_path)
        logger.info("stages from dvc.yaml: %s", " -> ".join(order))
        stage_task = run_stage.with_options(retries=retries, retry_delay_seconds=10)
        stages = [stage_task(stage, str(root_path), force) for stage in order]
    summary = {"stages": stages, **collect_outputs(root_path)}
    _publish(stages, summary)
    return summary
