"""Stopping scheduled runs from outside, end to end: a real ``segflow server``, ``segflow deploy``, a real
``segflow worker`` and the ``retrain`` deployment, in one project copy, in order:

1. a run is cancelled through the API (what the dashboard's Cancel button sends) while ``train`` runs:
   no stage process is left 20 s later, the run ends CANCELLED, the last good model is byte-identical;
2. the worker is SIGKILLed while ``train`` runs: no stage process is left 20 s later, the flow run
   leaves RUNNING (CRASHED, by the stage's leash, well inside the heartbeat window ``segflow deploy``
   configures), and the next run, with a new worker, resumes from the checkpoint;
3. a second pipeline in the same folder (the project lock is held): the worker's run ends CANCELLED
   with one line naming the holder, not FAILED with a traceback.
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
from segflow.ops.leash import descendants
from tests.conftest import copy_project, run_children
from tests.test_reliability import BIN, LONG, _outputs, _set

FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@pytest.fixture(scope="module")
def team(tmp_path_factory, reproduced, prefect_api) -> Iterator[dict]:
    """A copy of the session's tiny project, deployed to the session's server (``segflow deploy``)."""
    base = tmp_path_factory.mktemp("team-cancel")
    project = copy_project(reproduced.path, base / "project")
    state = {"project": project, "home": base / "prefect", "api": prefect_api, "workers": []}
    deploy = subprocess.run(
        [str(BIN / "segflow"), "deploy"], cwd=project, env=_env(state), capture_output=True, text=True, timeout=300
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    (found,) = httpx.post(
        f"{state['api']}/deployments/filter", json={"deployments": {"name": {"any_": ["retrain"]}}}, timeout=10
    ).json()
    state["deployment"] = found
    try:
        yield state
    finally:
        for worker in state["workers"]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)


def _env(state: dict, **extra: str) -> dict[str, str]:
    return stage_env(
        PREFECT_HOME=str(state["home"]),
        PREFECT_API_URL=state["api"],
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
        **extra,
    )


def _worker(state: dict) -> subprocess.Popen:
    log = (state["project"].parent / f"worker-{len(state['workers'])}.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "segflow"), "worker"],
        cwd=state["project"],
        env=_env(state),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    state["workers"].append(proc)
    return proc


def _start(state: dict) -> str:
    """A run of the deployment, as the dashboard's Run starts one; without the registration at its end (these
    tests are about stopping runs; tests/test_team_s3.py runs the whole scheduled retrain)."""
    url = f"{state['api']}/deployments/{state['deployment']['id']}/create_flow_run"
    return httpx.post(url, json={"parameters": {"register": False}}, timeout=10).json()["id"]


def _flow_run(state: dict, run_id: str) -> dict:
    return httpx.get(f"{state['api']}/flow_runs/{run_id}", timeout=10).json()


def _wait_state(state: dict, run_id: str, types: tuple[str, ...], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while (run := _flow_run(state, run_id))["state_type"] not in types:
        assert time.monotonic() < deadline, f"flow run still {run['state_type']} after {timeout:.0f} s"
        time.sleep(0.5)
    return run


def stage_processes(project: Path) -> list[str]:
    """Command lines of the project's live stage processes (``dvc repro`` and ``tasks.*``, leashes included)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if Path(os.readlink(entry / "cwd")) != project:
                continue
        except OSError:
            continue
        if stat[0] != "Z" and ("-m tasks." in cmdline or "repro --single-item" in cmdline):
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


def _training(state: dict, run_id: str, timeout: float = 240) -> None:
    """Until the deployment's run is mid-training: DVCLive has written an epoch past the first."""
    curve = state["project"] / "data/train/live/plots/metrics/train/loss.tsv"
    deadline = time.monotonic() + timeout
    while not (curve.is_file() and len(curve.read_text().splitlines()) > 2):
        run = _flow_run(state, run_id)
        assert run["state_type"] in ("SCHEDULED", "PENDING", "RUNNING"), f"ended before training: {run['state']}"
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)


def _gone_within(project: Path, seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := stage_processes(project)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_cancel_from_the_dashboard_stops_the_stage_and_keeps_the_last_good_model(team):
    project = team["project"]
    before = _outputs(project)
    params = _set(project, LONG)
    worker = _worker(team)
    try:
        run_id = _start(team)
        _training(team, run_id)
        # The dashboard's Cancel: the run goes to CANCELLING and the worker stops its process.
        cancel = {"state": {"type": "CANCELLING", "name": "Cancelling"}}
        httpx.post(f"{team['api']}/flow_runs/{run_id}/set_state", json=cancel, timeout=10).raise_for_status()
        left = _gone_within(project, 20)
        run = _wait_state(team, run_id, FINAL, timeout=60)
    finally:
        (project / "params.yaml").write_bytes(params)
    assert not left, left
    assert run["state_type"] == "CANCELLED", run["state"]
    assert worker.poll() is None, "the worker lives on to take the next run"
    assert _outputs(project) == before, "the last good model and metrics, byte for byte"


def test_a_killed_worker_leaves_no_stage_its_run_crashes_and_the_next_run_resumes(team):
    project = team["project"]
    params = _set(project, {"train": {"epochs": 30}})
    try:
        worker = _worker(team) if not team["workers"] or team["workers"][-1].poll() is not None else team["workers"][-1]
        run_id = _start(team)
        _training(team, run_id)
        checkpoints = list((project / ".segflow" / "checkpoints").glob("train-*/last.ckpt"))
        assert checkpoints, "an epoch is checkpointed before the kill"
        killed = time.monotonic()
        worker.send_signal(signal.SIGKILL)  # the worker alone: its machine's other processes must follow it
        worker.wait(timeout=10)
        _worker(team)  # the next one starts meanwhile (it takes a few seconds)
        left = _gone_within(project, 20)
        run = _wait_state(team, run_id, FINAL, timeout=90)
        crashed_after = time.monotonic() - killed
        assert not left, left
        assert run["state_type"] == "CRASHED", run["state"]
        # Marked by the run itself or its stage's leash, not left to the heartbeat automation's 90 s.
        assert "no heartbeat" not in (run["state"]["message"] or ""), f"{run['state']} after {crashed_after:.0f} s"

        again = _wait_state(team, _start(team), FINAL, timeout=300)
    finally:
        (project / "params.yaml").write_bytes(params)
    lines = [log["message"] for log in run_children(team["api"], again["id"], "logs")]
    assert again["state_type"] == "COMPLETED", again["state"]
    assert any("resuming from epoch" in line for line in lines), "\n".join(lines[-40:])


def test_a_run_that_finds_the_project_busy_ends_cancelled_with_one_line(team):
    project = team["project"]
    params = _set(project, LONG)
    if team["workers"][-1].poll() is not None:
        _worker(team)
    by_hand = subprocess.Popen(
        [str(BIN / "segflow"), "run"],
        cwd=project,
        env=_env(team),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not stage_processes(project):
            assert by_hand.poll() is None and time.monotonic() < deadline, by_hand.stdout.read()
            time.sleep(0.2)
        run = _wait_state(team, _start(team), FINAL, timeout=120)
    finally:
        os.killpg(by_hand.pid, signal.SIGINT)
        by_hand.communicate(timeout=60)
        (project / "params.yaml").write_bytes(params)
    message = run["state"]["message"] or ""
    assert run["state_type"] == "CANCELLED", run["state"]
    assert "\n" not in message and "Traceback" not in message and "another pipeline run" in message, message
    assert not _gone_within(project, 20)


# --- the two pieces on their own: real processes, no server -------------------------------------------------

_SESSION_CHILD = """
import subprocess, sys, time
# A child in a session of its own (as Prefect's worker starts a flow run): outside the leash's group.
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def _until_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


@pytest.mark.parametrize("tree", [True, False])
def test_a_leash_with_tree_also_stops_what_its_command_started_in_other_sessions(tree):
    import sys

    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    from segflow.proc import process_identity

    flags = ["--grace", "2", *(["--tree"] if tree else [])]
    command = [sys.executable, "-c", _SESSION_CHILD]
    leash = subprocess.Popen(
        [sys.executable, "-m", "segflow.ops.leash", process_identity(parent.pid), *flags, "--", *command],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    grandchild = int(leash.stdout.readline())
    try:
        parent.kill()
        parent.wait()
        assert leash.wait(timeout=30) != 0  # its command was stopped
        assert _until_gone(grandchild, 10) is tree  # without --tree, the other session lives on
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)


def test_a_flow_run_process_ends_when_its_worker_is_gone():
    import sys

    # worker -> flow run (watch_worker in it; no API); the worker is SIGKILLed and the run follows it.
    run = "from segflow.ops.orphan import watch_worker; import time; watch_worker('r', None, 0.1); time.sleep(120)"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {run!r}]); "
            "print(p.pid, flush=True); p.wait()",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    flow_run = int(worker.stdout.readline())
    time.sleep(1.0)  # the watch has read its parent
    assert _alive(flow_run)
    worker.kill()
    worker.wait()
    assert _until_gone(flow_run, 10)


def test_deploy_creates_the_automation_that_crashes_silent_runs(team):
    from segflow.ops.deploy import HEARTBEAT_S, MISSED_HEARTBEATS, ZOMBIE_AUTOMATION

    found = httpx.post(f"{team['api']}/automations/filter", json={}, timeout=10).json()
    (automation,) = [a for a in found if a["name"] == ZOMBIE_AUTOMATION]  # once, though deploy may run again
    trigger = automation["trigger"]
    assert trigger["posture"] == "Proactive" and trigger["within"] == HEARTBEAT_S * MISSED_HEARTBEATS
    assert trigger["after"] == ["prefect.flow-run.heartbeat"] and "prefect.flow-run.Completed" in trigger["expect"]
    assert [(a["type"], a["state"]) for a in automation["actions"]] == [("change-flow-run-state", "CRASHED")]


@pytest.mark.slow  # 2-3 min: waits out the heartbeat window
def test_a_machine_that_dies_whole_has_its_run_crashed_by_the_heartbeat_automation(team):
    # Every process of the worker's "machine" at once (worker, leashes, flow run, stage): nobody is left
    # to say so, and the server's automation marks the run CRASHED once its heartbeats stop.
    from segflow.ops.deploy import HEARTBEAT_S, MISSED_HEARTBEATS

    project = team["project"]
    params = _set(project, LONG)
    worker = _worker(team)
    try:
        run_id = _start(team)
        _training(team, run_id)
        time.sleep(HEARTBEAT_S + 5)  # a heartbeat was sent: the trigger is armed
        victims = [worker.pid, *descendants(worker.pid)]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)  # frozen first, so no process sees another die
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        run = _wait_state(team, run_id, FINAL, timeout=HEARTBEAT_S * MISSED_HEARTBEATS + 90)
        took = time.monotonic() - killed
    finally:
        (project / "params.yaml").write_bytes(params)
    assert run["state_type"] == "CRASHED", run["state"]
    assert "no heartbeat" in run["state"]["message"], run["state"]
    assert took <= HEARTBEAT_S * (MISSED_HEARTBEATS + 1) + 30, f"{took:.0f} s"
