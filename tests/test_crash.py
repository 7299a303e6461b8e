"""Crashes around the Prefect server: real processes, a real ``segflow server``, real SIGKILLs.

One project copy and one Prefect home (database, leases) for the module, in order:

1. the project's ``segflow server`` is killed while ``segflow run`` trains: the run stops its stage,
   ends with one line (no traceback, no minutes of retries) and leaves the last good outputs;
2. the server is started again and a run is killed with every process of it at once, server
   included (power loss, the OOM killer): the run starts by giving back the gpu slot step 1 leaked;
3. the next run (server started again) marks both runs and their stage task runs CRASHED, reclaims
   the gpu slot step 2 leaked, and works: no slot stays taken;
4. ``segflow worker`` whose server goes away ends with one line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from segflow.ops.env import stage_env
from segflow.ops.server import free_port, healthy
from tests.conftest import copy_project
from tests.test_reliability import BIN, LONG, _outputs, _set, _wait_for_training, _wait_until_gone

GRACE = "2"  # seconds the server may fail its health check before segflow gives up on it


@pytest.fixture(scope="module")
def crash(tmp_path_factory, reproduced) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("crash")
    project = copy_project(reproduced.path, base / "project")
    state = {"project": project, "home": base / "prefect", "port": free_port(), "flow_runs": []}
    yield state
    if state.get("server") is not None and state["server"].poll() is None:  # a test left it (failed, deselected)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(state["server"].pid, signal.SIGKILL)


def _env(crash: dict, **extra: str) -> dict[str, str]:
    env = stage_env(PREFECT_HOME=str(crash["home"]), SEGFLOW_SERVER_GRACE_S=GRACE, **extra)
    env.pop("PREFECT_API_URL", None)
    return env


def _server(crash: dict) -> subprocess.Popen:
    """``segflow server`` in the project (found by ``segflow run`` through its server.json)."""
    proc = subprocess.Popen(
        [str(BIN / "segflow"), "server", "--port", str(crash["port"])],
        cwd=crash["project"],
        env=_env(crash),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not healthy(_api(crash)):
        assert proc.poll() is None and time.monotonic() < deadline, "segflow server did not start"
        time.sleep(0.5)
    return proc


def _api(crash: dict) -> str:
    return f"http://127.0.0.1:{crash['port']}/api"


def _run(crash: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "segflow"), "run"],
        cwd=crash["project"],
        env=_env(crash),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _flow_run_name(output: str) -> str:
    return output.split("Beginning flow run '", 1)[1].split("'", 1)[0]


def test_a_killed_server_ends_the_run_with_one_line_and_keeps_the_outputs(crash):
    project = crash["project"]
    before, lock = _outputs(project), (project / "dvc.lock").read_bytes()
    server = _server(crash)
    params = _set(project, LONG)
    try:
        run = _run(crash)
        _wait_for_training(project, run, timeout=180)
        _kill_group(server)  # the server and its `prefect server start`
        started = time.monotonic()
        output = run.communicate(timeout=90)[0]
        seconds = time.monotonic() - started
        left = _wait_until_gone(project)
    finally:
        (project / "params.yaml").write_bytes(params)
    crash["flow_runs"].append(_flow_run_name(output))
    assert run.returncode == 1, output
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"segflow: error: the Prefect server at {_api(crash)} stopped answering"), output
    assert "stopped stage train" in last and "segflow server" in last
    assert "Traceback" not in output
    assert seconds < 60, f"gave up after {seconds:.0f} s"
    assert not left, left
    assert _outputs(project) == before, "the last good model and metrics are in place"
    assert (project / "dvc.lock").read_bytes() == lock


def test_power_loss_mid_training_then_the_slot_it_leaked_is_reclaimed(crash):
    project = crash["project"]
    before = _outputs(project)
    server = _server(crash)
    params = _set(project, LONG)
    try:
        run = _run(crash)
        _wait_for_training(project, run, timeout=180)
        # Every process of the run at once, server included: nothing gets to clean up.
        victims = [server.pid, run.pid, *_pids_in(project)]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.killpg(server.pid, signal.SIGKILL)
        output = run.communicate(timeout=30)[0]
        server.wait(timeout=10)
        left = _wait_until_gone(project)
    finally:
        (project / "params.yaml").write_bytes(params)
    assert not left, left
    crash["flow_runs"].append(_flow_run_name(output))
    first = crash["flow_runs"][0]
    assert f"reclaimed the gpu slot held by flow run {first}" in output, "step 1's slot is given back at once"
    # What the killed stage left in the workspace is put back by the next run (DVC checks it out).
    crash["before"] = before


def _pids_in(project: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if Path(os.readlink(entry / "cwd")) == project:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_the_next_run_marks_the_dead_runs_crashed_reclaims_the_slot_and_works(crash):
    project = crash["project"]
    server = crash["server"] = _server(crash)  # the worker's test below takes it down
    run = _run(crash)
    output = run.communicate(timeout=300)[0]
    api = _api(crash)
    runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
    tasks = httpx.post(f"{api}/task_runs/filter", json={}, timeout=10).json()
    gpu = httpx.get(f"{api}/v2/concurrency_limits/gpu", timeout=10).json()
    assert server.poll() is None
    assert run.returncode == 0, output
    first, second = crash["flow_runs"]
    assert f"flow run {second} was left RUNNING by a killed segflow; marked CRASHED" in output
    assert f"reclaimed the gpu slot held by flow run {second}" in output
    by_name = {r["name"]: r for r in runs}
    assert by_name[first]["state_type"] == "CRASHED" and by_name[second]["state_type"] == "CRASHED"
    assert not [t["name"] for t in tasks if t["state_type"] in ("RUNNING", "PENDING")], "no task run left RUNNING"
    assert gpu["active_slots"] == 0
    assert _outputs(project) == crash["before"], "the last good model and metrics, byte for byte"
    assert not list((project / ".segflow" / "gpu-leases").glob("*.json"))


def test_a_worker_whose_server_goes_away_ends_with_one_line(crash):
    server = crash.get("server")
    if server is None or server.poll() is not None or not healthy(_api(crash)):
        server = _server(crash)
    worker = subprocess.Popen(
        [str(BIN / "segflow"), "worker"],
        cwd=crash["project"],
        env=_env(crash, PREFECT_WORKER_QUERY_SECONDS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 120
        for line in worker.stdout:
            lines.append(line)
            if "started" in line.lower() or time.monotonic() > deadline:
                break
        _kill_group(server)
        output = "".join(lines) + worker.communicate(timeout=90)[0]
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    assert worker.returncode == 1, output
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"segflow worker: error: the Prefect server at {_api(crash)} stopped answering"), output
    assert "Traceback" not in output


def test_a_killed_segflow_server_takes_its_prefect_server_with_it(tmp_path):
    # `segflow server` keeps Prefect's server on a leash: SIGKILL of segflow frees the port and database.
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = stage_env(PREFECT_HOME=str(tmp_path / "home"))
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [str(BIN / "segflow"), "--root", str(Path(__file__).parents[1]), "server", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not healthy(api):
            assert proc.poll() is None and time.monotonic() < deadline, "segflow server did not start"
            time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while healthy(api) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not healthy(api), "Prefect's server outlived segflow server"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
