"""What training writes to a Prefect server: database growth and log rows for 10 and 100 epochs, side by side.

One ``segflow server`` (SQLite, its own PREFECT_HOME) serves two ``segflow run`` of the tiny configuration,
10 epochs then 100 epochs; after each, the database file's size and the run's log rows over the REST API.
Training logs one line per epoch and a progress artifact at most every 30 s, never a line per step, so the
growth per epoch is what one log row costs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from bench._util import BIN, TINY, env, fresh_project, merge, timed
from segflow.ops.runner import PROGRESS_EVERY_S

TITLE = "Prefect server database growth from training runs (log volume)"


def _database(home: Path) -> int:
    """Bytes of the server's SQLite database once its write-ahead log is folded in (pages in use)."""
    import sqlite3

    with sqlite3.connect(home / "prefect.db", timeout=30) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
        return pages * db.execute("PRAGMA page_size").fetchone()[0]


def _logs(api: str, run_name: str) -> tuple[int, int]:
    """(log rows, bytes of their messages) of the flow run named ``run_name``."""
    (run,) = httpx.post(
        f"{api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [run_name]}}}, timeout=10
    ).json()
    count, size, offset = 0, 0, 0
    while True:
        page = httpx.post(
            f"{api}/logs/filter",
            json={"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200, "offset": offset},
            timeout=10,
        ).json()
        count += len(page)
        size += sum(len(log["message"].encode()) for log in page)
        offset += len(page)
        if len(page) < 200:
            return count, size


def run(work: Path) -> str:
    from segflow.ops.server import free_port, healthy

    home = work / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    project = fresh_project(work / "project", TINY)
    server = subprocess.Popen(
        [str(BIN / "segflow"), "server", "--port", str(port)],
        cwd=project,
        env=env(PREFECT_HOME=str(home)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    rows = []
    try:
        deadline = time.monotonic() + 180
        while not healthy(api):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("segflow server did not start")
            time.sleep(0.5)
        time.sleep(5)  # the server's own start-up writes settle
        empty = _database(home)
        previous = empty
        for epochs in (10, 100):
            params = project / "params.yaml"
            params.write_text(yaml.safe_dump(merge(yaml.safe_load(params.read_text()), {"train": {"epochs": epochs}})))
            seconds, output = timed([str(BIN / "segflow"), "run"], project, env(PREFECT_API_URL=api))
            name = next(line.split("'")[1] for line in output.splitlines() if "Beginning flow run" in line)
            time.sleep(5)  # logs are sent in batches: let the last ones land
            size = _database(home)
            rows.append((epochs, seconds, _logs(api, name), size, size - previous))
            previous = size
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    (_, _, (logs_10, bytes_10), _, grew_10), (_, _, (logs_100, bytes_100), _, grew_100) = rows
    per_epoch_logs = (logs_100 - logs_10) / 90
    per_epoch_bytes = (bytes_100 - bytes_10) / 90
    per_epoch_db = (grew_100 - grew_10) / 90
    lines = [
        "One `segflow server` (SQLite), two `segflow run` of the tiny configuration against it, 10 epochs then",
        "100 (the second reruns train and evaluate). The database is measured in pages in use, its write-ahead",
        "log folded in.",
        "",
        "| run | `segflow run` | log rows of the run | their text | database after it | growth |",
        "|---|---:|---:|---:|---:|---:|",
        f"| server started, no run | | | | {empty / 1e6:.2f} MB | |",
    ]
    for epochs, seconds, (logs, size), total, grown in rows:
        lines.append(
            f"| {epochs} epochs | {seconds:.0f} s | {logs} | {size / 1e3:.1f} kB | {total / 1e6:.2f} MB | "
            f"{grown / 1e3:.0f} kB |"
        )
    lines += [
        "",
        f"Each further epoch added {per_epoch_logs:.1f} log rows ({per_epoch_bytes:.0f} bytes of text) and "
        f"{per_epoch_db / 1e3:.1f} kB of database (the two runs' difference over 90 epochs): one log line per "
        "epoch, none per step; the rest is the run's fixed cost (stage lines, task runs, artifacts and their "
        f"events) and the progress artifact, written at most every {PROGRESS_EVERY_S:.0f} s (an event each), "
        "so it follows the run's length, not its epochs. Before this benchmark the artifact was written once "
        "per epoch, which made tiny epochs cost an event each. Prefect keeps events for "
        "`PREFECT_SERVER_EVENTS_RETENTION_PERIOD` (7 days by default); flow runs and their logs stay until "
        "deleted, so a team server deletes the runs it no longer needs on a schedule.",
        "",
    ]
    return "\n".join(lines)
