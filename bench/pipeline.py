"""The demo pipeline end to end, and what a run costs when nothing changed.

Side by side, in one scratch project (a committed copy of this repository's
code and params): the demo pipeline through the Prefect flow from nothing
(``segflow run``, what ``make demo`` runs); then all stages forced, once by
``dvc repro --force`` and once by ``segflow run --force`` (both warm: the
flow's overhead on a full run); then no-op runs, where every stage is skipped:
``dvc repro``, ``segflow run`` with its temporary Prefect server, and
``segflow run`` against a running server.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from bench._util import BIN, env, fresh_project, median_time, timed
from segflow.ops.server import local_server

TITLE = "Pipeline: demo run and no-op runs"


def _check(output: str, ran: bool, what: str) -> None:
    if ("Running stage" in output) != ran:
        raise RuntimeError(f"{what}: expected {'all' if ran else 'no'} stages to run:\n{output[-2000:]}")


def run(work: Path, repeats: int = 3) -> str:
    """Measure; return the markdown section for docs/benchmarks.md."""
    project = fresh_project(work / "project")
    flow_env = env(PREFECT_HOME=str(work / "prefect-home"))
    segflow = [str(BIN / "segflow"), "run"]
    dvc = [str(BIN / "python"), "-m", "dvc", "repro"]

    cold_flow, out = timed(segflow, project, flow_env)
    _check(out, True, "segflow run (cold)")
    metrics = json.loads((project / "data/evaluate/metrics.json").read_text())
    forced_dvc, out = timed([*dvc, "--force"], project)
    _check(out, True, "dvc repro --force")
    forced_flow, out = timed([*segflow, "--force"], project, flow_env)
    _check(out, True, "segflow run --force")

    noop_dvc, out = median_time(dvc, project, repeats)
    _check(out, False, "dvc repro")
    noop_flow, out = median_time(segflow, project, repeats, flow_env)
    _check(out, False, "segflow run")
    with local_server(work / "prefect-server-home") as api:
        server_env = env(PREFECT_HOME=str(work / "prefect-home"), PREFECT_API_URL=api)
        noop_server, out = median_time(segflow, project, repeats, server_env)
    _check(out, False, "segflow run (server)")

    rows = [
        ("demo pipeline from nothing, through the flow", "`segflow run` (what `make demo` runs)", cold_flow, 1),
        ("all stages, DVC alone (warm)", "`dvc repro --force`", forced_dvc, 1),
        ("all stages, through the flow (warm)", "`segflow run --force`", forced_flow, 1),
        ("no-op, DVC alone", "`dvc repro`", noop_dvc, repeats),
        ("no-op flow, temporary Prefect server", "`segflow run`", noop_flow, repeats),
        ("no-op flow, running Prefect server", "`PREFECT_API_URL=... segflow run`", noop_server, repeats),
    ]
    iou, dice = metrics["iou"]["macro"], metrics["dice"]["macro"]
    stages = len(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    return "\n".join(
        [
            "| measurement | command | wall s | runs (median of) | vs no-op `dvc repro` |",
            "|---|---|---:|---:|---:|",
            *[f"| {what} | {cmd} | {secs:.1f} | {n} | {secs / noop_dvc:.1f}x |" for what, cmd, secs, n in rows],
            "",
            f"Flow overhead on a full run: {forced_flow - forced_dvc:+.1f} s "
            f"({forced_flow / forced_dvc:.2f}x `dvc repro --force`), "
            f"{(forced_flow - forced_dvc) / stages:+.1f} s per stage ({stages} stages). "
            f"No-op run against a running server: {noop_server - noop_dvc:+.1f} s against `dvc repro` "
            "(goal: within 2 s). "
            f"Demo model on the test split: macro IoU {iou:.4f}, macro Dice {dice:.4f} ({metrics['images']} images).",
        ]
    )
