"""Shared fixtures: a tiny seeded configuration, isolated environment, project paths, and the expensive
things built once per session and handed out as cheap copies (a reproduced project, a prepared dataset)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# huggingface_hub reads this once, at import: set it before anything imports smp,
# so a hub name fails at once instead of waiting on the network.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from bench._util import TINY
from segflow.params import Params, parse_params

# pytest-xdist's workers ignore SIGINT (the controller handles Ctrl-C), and an ignored signal is inherited
# across exec: every server, worker and `segflow run` a test starts would then ignore the Ctrl-C it is sent,
# and the tests of Ctrl-C behaviour would test nothing. Give the workers (and so their children) the default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]
# The real ISBI 2012 membrane set, read in place (never copied); SEGFLOW_ISBI2012 points elsewhere.
ISBI = Path(os.environ.get("SEGFLOW_ISBI2012", ROOT.parent / "shared" / "datasets" / "isbi2012-membrane"))

# TINY (bench/_util.py): a configuration small enough for a CPU test: 32x32 scenes, a shallow net, one epoch.


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No network, no telemetry, no writes to the user's Prefect home, a git identity."""
    home = tmp_path_factory.mktemp("prefect-home")
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "GIT_AUTHOR_NAME": "segflow tests",
        "GIT_AUTHOR_EMAIL": "tests@segflow.invalid",
        "GIT_COMMITTER_NAME": "segflow tests",
        "GIT_COMMITTER_EMAIL": "tests@segflow.invalid",
    }.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def tiny_params() -> Params:
    return parse_params(TINY)


@pytest.fixture
def tiny_paths(tiny_params, tmp_path):
    return tiny_params.paths.under(tmp_path)


@dataclass(frozen=True)
class Reproduced:
    """A committed git + DVC project (this repo's code, ``TINY`` params) after one real ``dvc repro``."""

    path: Path
    #: What that first ``dvc repro`` printed (it ran every stage).
    output: str


def _once(tmp_path_factory, name: str, build) -> tuple[Path, str]:
    """``build(folder) -> str`` run once per test run, even across pytest-xdist workers (a file lock in the
    run's shared temporary folder); every caller gets the folder and what ``build`` returned."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the workers' common parent
    folder, done = shared / name, shared / f"{name}.done"
    with (shared / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker builds, the others wait for it
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            done.write_text(build(folder))  # written last: a failed build is rebuilt, not half-used
    return folder, done.read_text()


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> Reproduced:
    """Built once per test run; tests take copies (:func:`copy_project`), never this folder itself."""
    from bench._util import fresh_project
    from segflow.ops.env import stage_env

    def build(folder: Path) -> str:
        project = fresh_project(folder / "project", TINY)
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", "repro"], cwd=project, env=stage_env(), capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.fail(f"dvc repro of the shared tiny project failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "first good run"]):
            subprocess.run(cmd, cwd=project, env=stage_env(), check=True, capture_output=True)
        return proc.stdout + proc.stderr

    folder, output = _once(tmp_path_factory, "reproduced", build)
    return Reproduced(folder / "project", output)


def copy_project(source: Path, dest: Path) -> Path:
    """A copy of a project folder: work tree, git repository, DVC cache and outputs (a few MB).

    DVC keys its state by inode and mtime, so the copy re-hashes its outputs once and then sees them
    as the same data: ``dvc status`` is clean and nothing reruns.
    """
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """``TINY``'s ingest and augment outputs, made once in-process (``run()`` of each stage): a source to copy."""

    def build(folder: Path) -> str:
        from segflow import augment
        from segflow.data import ingest

        params = parse_params(TINY)
        paths = params.paths.under(folder)
        ingest.run(params, paths)
        augment.run(params, paths)
        return str(paths.ingest.parent)

    _, data = _once(tmp_path_factory, "prepared", build)
    return Path(data)


@pytest.fixture
def prepared(tiny_params, tiny_paths, prepared_data):
    """``(params, paths)`` with ingest and augment already run (copied from the shared project)."""
    for stage in ("ingest", "augment"):
        target = getattr(tiny_paths, stage)
        shutil.copytree(prepared_data / target.name, target)
    return tiny_params, tiny_paths


def isbi_or_skip() -> Path:
    if not (ISBI / "images").is_dir():
        pytest.skip(f"ISBI 2012 dataset not found at {ISBI}")
    return ISBI


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> str:
    """One real Prefect server for the whole session, started as users start it: ``segflow server --port P``
    (127.0.0.1, its own PREFECT_HOME, the dashboard told its API port). Stopped with Ctrl-C (SIGINT) at the end."""
    import time

    import httpx

    from segflow.ops.env import stage_env
    from segflow.ops.server import free_port, healthy

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    log = (home / "segflow-server.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "segflow"), "--root", str(ROOT), "server", "--port", str(port)],
        env=stage_env(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_API_URL=""),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while not healthy(api):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"segflow server did not start: {(home / 'segflow-server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    assert httpx.get(f"{api}/health", timeout=5).json() is True
    yield api
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("segflow server did not stop on Ctrl-C (SIGINT) within 30 s")
    finally:
        log.close()


def flow_run_named_in(output: str, api: str) -> dict:
    """The flow run a ``segflow run`` output names ("Beginning flow run 'xyz'"), read from the API."""
    import re

    import httpx

    name = re.search(r"Beginning flow run '([^']+)'", output).group(1)
    (run,) = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [name]}}}, timeout=10).json()
    return run


def run_children(api: str, run_id: str, kind: str) -> list[dict]:
    """The task runs, logs or artifacts of one flow run."""
    import httpx

    body = {"task_runs": {"flow_run_id": {"any_": [run_id]}}}
    if kind == "logs":
        body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}
    elif kind == "artifacts":
        body = {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    return httpx.post(f"{api}/{kind}/filter", json=body, timeout=10).json()
