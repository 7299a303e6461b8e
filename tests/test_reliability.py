"""Runs you can interrupt: real processes, real signals, real DVC and a real Prefect server.

On one tiny project that has been through a full ``dvc repro``: every failure
(bad params, bad data, no GPU, SIGKILL / SIGTERM / SIGINT of ``segflow run``
during training) must leave the previous model and metrics byte-identical,
no process of the run behind, no flow run RUNNING, no debris, and a project
where the next ``segflow run`` works at once.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from bench._util import merge
from segflow.ops.env import stage_env
from tests.conftest import copy_project
from tests.test_pipeline import _dvc

BIN = Path(sys.executable).parent
LONG = {"train": {"epochs": 500}}  # long enough to be killed mid-training


@pytest.fixture(scope="module")
def project(tmp_path_factory, reproduced) -> Path:
    """A copy of the session's tiny project after its first good run (reproduced and committed)."""
    return copy_project(reproduced.path, tmp_path_factory.mktemp("reliability") / "project")


def _commit(project: Path, message: str) -> None:
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", message]):
        subprocess.run(cmd, cwd=project, env=stage_env(), check=True, capture_output=True)


def _outputs(project: Path) -> dict[str, str]:
    """sha256 of every file of the train and evaluate stages' outputs (model, metrics, curves)."""
    found = {}
    for folder in ("data/ingest", "data/train", "data/evaluate"):
        for path in sorted((project / folder).rglob("*")):
            if path.is_file():
                found[str(path.relative_to(project))] = hashlib.sha256(path.read_bytes()).hexdigest()
    assert any(name.endswith("model.safetensors") for name in found)
    return found


def _set(project: Path, override: dict) -> bytes:
    """Lay ``override`` over params.yaml; return the previous bytes."""
    path = project / "params.yaml"
    before = path.read_bytes()
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(before), override), sort_keys=False))
    return before


def _processes_in(project: Path) -> list[str]:
    """Command lines of live processes whose working folder is the project (stages, DVC, leashes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) != project:
                continue
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if stat[0] != "Z":
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found


def _wait_until_gone(project: Path, seconds: float = 15) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := _processes_in(project)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _debris(project: Path) -> list[str]:
    untracked = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=project, capture_output=True, text=True
    ).stdout.splitlines()
    scratch = project / ".segflow" / "tmp"
    leftovers = [str(p) for p in scratch.iterdir()] if scratch.is_dir() else []
    return [line for line in untracked if line.startswith("??")] + leftovers


@pytest.mark.parametrize(
    ("override", "stage", "expected"),
    [
        ({"train": {"lr": "fast"}}, "train", "train.lr"),
        ({"ingest": {"source": "folder", "path": "data/raw"}}, "ingest", "data/raw: no images/ or masks/ folder"),
    ],
    ids=["bad-value", "bad-data"],
)
def test_a_failing_stage_keeps_the_last_good_outputs(project, override, stage, expected):
    before = _outputs(project)
    params = _set(project, override)
    try:
        proc = _dvc(project, "repro", "--single-item", stage, check=False)
    finally:
        (project / "params.yaml").write_bytes(params)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("segflow ")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert _outputs(project) == before
    assert "up to date" in _dvc(project, "status").stdout


@pytest.mark.parametrize(
    "value", ["../outside", "/tmp/segflow-escape", "data/link/train"], ids=["dot-dot", "absolute", "symlink"]
)
def test_outputs_outside_the_project_are_refused_before_anything_runs(project, value, tmp_path):
    (project / "data/link").symlink_to(tmp_path)
    before = _outputs(project)
    params = _set(project, {"paths": {"train": value}})
    try:
        proc = _segflow(project, None)
        output = proc.communicate(timeout=60)[0]
        repro = _dvc(project, "repro", "--single-item", "train", check=False)
    finally:
        (project / "params.yaml").write_bytes(params)
        (project / "data/link").unlink()
    assert proc.returncode == 1
    assert output.strip().splitlines() == [
        f"segflow: error: {project / 'params.yaml'}: paths.train: {value} is outside the project ({project}); "
        "stage outputs stay inside it, e.g. paths.train: data/train"
    ]
    assert repro.returncode != 0
    assert _outputs(project) == before
    assert not (project.parent / "outside").exists() and not Path("/tmp/segflow-escape").exists()
    assert not list(tmp_path.iterdir()), "nothing written through the link"


@pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import torch; assert not torch.cuda.is_available()"]).returncode != 0,
    reason="this machine has a GPU",
)
def test_gpu_accelerator_without_a_gpu_is_one_line_and_keeps_the_outputs(project):
    before = _outputs(project)
    params = _set(project, {"train": {"accelerator": "gpu"}})
    try:
        proc = _dvc(project, "repro", "--single-item", "train", check=False)
    finally:
        (project / "params.yaml").write_bytes(params)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("segflow ")]
    assert errors == [
        "segflow train: error: train.accelerator is gpu, but torch finds no usable GPU on this machine "
        "(no CUDA device); set train.accelerator: auto (a GPU when there is one, else the CPU) or cpu"
    ]
    assert "Traceback" not in proc.stderr and "MisconfigurationException" not in proc.stderr
    assert _outputs(project) == before


def test_corrupt_training_data_keeps_the_last_good_model(project):
    before = _outputs(project)
    manifest = (project / "data/ingest/manifest.csv").read_text().splitlines()
    first_train = next(line.split(",")[0] for line in manifest[1:] if line.split(",")[1] == "train")
    image = project / "data/ingest/images" / f"{first_train}.png"
    good = image.read_bytes()
    image.unlink()  # DVC's cache holds the file: replace the link, never write through it
    image.write_bytes(good[:50])
    try:
        proc = _dvc(project, "repro", "--single-item", "train", "--force", check=False)
    finally:
        image.unlink()
        image.write_bytes(good)
    assert proc.returncode != 0
    assert f"{image.name}: cannot read image" in proc.stderr
    assert _outputs(project) == before


def _segflow(project: Path, api: str | None, *args: str) -> subprocess.Popen:
    env = stage_env(**({"PREFECT_API_URL": api} if api else {}))
    if api is None:
        env.pop("PREFECT_API_URL", None)
    return subprocess.Popen(
        [str(BIN / "segflow"), "run", *args],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # as a terminal would run it: Ctrl-C goes to its process group
    )


def _wait_for_training(project: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the run is mid-training: DVCLive has written the first epoch's curve."""
    curve = project / "data/train/live/plots/metrics/train/loss.tsv"
    deadline = time.monotonic() + timeout
    while not (curve.is_file() and len(curve.read_text().splitlines()) > 2):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)


def _running(api: str) -> list[dict]:
    runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
    return [r for r in runs if r["state_type"] in ("RUNNING", "PENDING")]


@pytest.mark.parametrize(
    "signum",
    [
        signal.SIGKILL,
        # The same path with a different signal: in `make reliability` and `make test-all`, not the default run.
        pytest.param(signal.SIGTERM, marks=pytest.mark.slow),
        pytest.param(signal.SIGINT, marks=pytest.mark.slow),
    ],
    ids=["SIGKILL", "SIGTERM", "SIGINT"],
)
def test_killing_segflow_run_mid_training_stops_everything_and_keeps_the_outputs(project, prefect_api, signum):
    before = _outputs(project)
    params = _set(project, LONG)
    try:
        proc = _segflow(project, prefect_api)
        _wait_for_training(project, proc)
        started = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)  # Ctrl-C in a terminal: the whole foreground group
        else:
            os.kill(proc.pid, signum)
        output = proc.communicate(timeout=60)[0]
        left = _wait_until_gone(project)
        seconds = time.monotonic() - started
    finally:
        (project / "params.yaml").write_bytes(params)
    assert not left, f"still running after {seconds:.0f} s: {left}"
    assert seconds < 20
    if signum != signal.SIGKILL:
        assert proc.returncode == 128 + signum
        last = output.strip().splitlines()[-1]
        assert last.startswith(f"segflow: stopped by {signal.Signals(signum).name}: the running stage was stopped")
        assert "Traceback" not in output
    deadline = time.monotonic() + 10
    while _running(prefect_api) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _running(prefect_api) == [], "no flow run left RUNNING"
    gpu = httpx.get(f"{prefect_api}/v2/concurrency_limits/gpu", timeout=10).json()
    assert gpu["active_slots"] == 0, "the GPU slot is given back, even after a SIGKILL"
    assert _outputs(project) == before, "the last good model and metrics are back, byte for byte"
    assert not _debris(project)


def test_after_the_kills_the_next_run_works_at_once(project, prefect_api):
    proc = _segflow(project, prefect_api)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert "segflow: pipeline finished" in output
    assert not _debris(project)
    assert "up to date" in _dvc(project, "status").stdout


# Slow (about 50 s; in make reliability and make test-all) to keep the default run near ten minutes.
@pytest.mark.slow
def test_two_runs_at_once_the_second_names_the_first(project, prefect_api):
    params = _set(project, LONG)
    try:
        first = _segflow(project, prefect_api, "--force")
        _wait_for_training(project, first)
        second = _segflow(project, prefect_api)
        output = second.communicate(timeout=120)[0]
        os.killpg(first.pid, signal.SIGINT)
        first.communicate(timeout=60)
    finally:
        (project / "params.yaml").write_bytes(params)
    assert second.returncode == 1
    last = output.strip().splitlines()[-1]
    assert last.startswith("segflow: error: ") and f"PID {first.pid}" in last and f"kill {first.pid}" in last
    assert not _wait_until_gone(project)


# Slow (about 50 s; in make reliability and make test-all) to keep the default run near ten minutes.
@pytest.mark.slow
def test_sigkill_with_the_temporary_server_leaves_no_server_behind(project, monkeypatch, tmp_path):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    params = _set(project, LONG)
    try:
        proc = _segflow(project, None)
        _wait_for_training(project, proc, timeout=240)
        servers = [p for p in _processes_in(project) if "prefect server start" in p]
        assert servers, "segflow started its own server"
        proc.kill()
        proc.communicate(timeout=30)
        left = _wait_until_gone(project)
    finally:
        (project / "params.yaml").write_bytes(params)
    assert not left, left
