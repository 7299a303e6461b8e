"""The demo pipeline end to end, and what a run costs when nothing changed.

Side by side, in one scratch project (a committed copy of this repository's
code and params): the demo pipeline through the Prefect flow (``segflow run``,
what ``make demo`` runs) from nothing; the same stages by ``dvc repro --force``
(the flow's overhead on a full run); then no-op runs, where every stage is
skipped: ``dvc repro``, ``segflow run`` with its temporary Prefect server, and
``segflow run`` against a running server.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import httpx

from bench._util import BIN, env, fresh_project, median_time, timed

TITLE = "Pipeline: demo run and no-op runs"


def _server(home: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return proc, api
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("Prefect server did not start within 180 s")


def _check_noop(output: str, what: str) -> None:
    if "Running stage" in output:
        raise RuntimeError(f"{what} was meant to be a no-op but ran a stage:\n{output[-2000:]}")


def run(work: Path, repeats: int = 3) -> str:
    """Measure; return the markdown section for docs/benchmarks.md."""
    project = fresh_project(work / "project")
    home = work / "prefect-home"
    flow_env = env(PREFECT_HOME=str(home))
    segflow = [str(BIN / "segflow"), "run"]
    dvc = [str(BIN / "python"), "-m", "dvc", "repro"]

    cold_flow, _ = timed(segflow, project, flow_env)
    metrics = json.loads((project / "data/evaluate/metrics.json").read_text())
    noop_dvc, out = median_time(dvc, project, repeats)
    _check_noop(out, "dvc repro")
    noop_flow, out = median_time(segflow, project, repeats, flow_env)
    _check_noop(out, "segflow run")
    server, api = _server(work / "prefect-server-home")
    try:
        noop_server, out = median_time(segflow, project, repeats, env(PREFECT_HOME=str(home), PREFECT_API_URL=api))
        _check_noop(out, "segflow run (server)")
    finally:
        server.terminate()
        server.wait(timeout=30)
    forced_dvc, _ = timed([*dvc, "--force"], project)

    iou, dice = metrics["iou"]["macro"], metrics["dice"]["macro"]
    rows = [
        ("demo pipeline, from nothing, through the flow", "`segflow run` (= `make demo` after install)", cold_flow, 1),
        ("demo pipeline, all stages, DVC alone", "`dvc repro --force`", forced_dvc, 1),
        ("no-op, DVC alone", "`dvc repro`", noop_dvc, repeats),
        ("no-op flow, temporary Prefect server", "`segflow run`", noop_flow, repeats),
        ("no-op flow, running Prefect server", "`PREFECT_API_URL=... segflow run`", noop_server, repeats),
    ]
    lines = [
        "| measurement | command | wall s | runs (median) | vs no-op `dvc repro` |",
        "|---|---|---:|---:|---:|",
        *[f"| {what} | {cmd} | {secs:.1f} | {n} | {secs / noop_dvc:.1f}x |" for what, cmd, secs, n in rows],
        "",
        f"Demo model on the test split: macro IoU {iou:.4f}, macro Dice {dice:.4f} "
        f"({metrics['images']} images). Flow overhead on a full run: "
        f"{cold_flow - forced_dvc:+.1f} s ({cold_flow / forced_dvc:.2f}x `dvc repro --force`; "
        "the forced run finds the outputs already in the DVC cache, the cold one does not).",
    ]
    return "\n".join(lines)
