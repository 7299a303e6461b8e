"""Scheduled retraining you can watch: `segflow deploy`, a real `segflow worker`, runs read back over REST,
Prefect's own CLI listings, and the dashboard in a real headless browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from bench._util import fresh_project, merge
from segflow.ops.env import stage_env
from tests.conftest import TINY, run_children

BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _cli(project: Path, api: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "segflow"), *args],
        cwd=project,
        env=stage_env(PREFECT_API_URL=api),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return fresh_project(tmp_path_factory.mktemp("operate") / "project", TINY)


@pytest.fixture(scope="module")
def deployment(project, prefect_api) -> dict:
    for _ in range(2):  # idempotent: the second run updates the same deployment
        proc = _cli(project, prefect_api, "deploy")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    (found,) = httpx.post(
        f"{prefect_api}/deployments/filter", json={"deployments": {"name": {"any_": ["retrain"]}}}, timeout=10
    ).json()
    return found


@pytest.fixture(scope="module")
def worker(project, prefect_api, deployment):
    """`segflow worker` with no arguments, in the project, polling every second."""
    log = (project.parent / "worker.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "segflow"), "worker"],
        cwd=project,
        env=stage_env(
            PREFECT_API_URL=prefect_api, PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1"
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    yield proc
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def _run_deployment(api: str, deployment: dict, timeout: float = 300) -> dict:
    run = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={}, timeout=10).json()
    deadline = time.monotonic() + timeout
    while True:
        run = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=10).json()
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        assert time.monotonic() < deadline, f"flow run stuck in {run['state_type']}"
        time.sleep(0.5)


def _lines(api: str, run_id: str) -> list[str]:
    """The run's log lines, once its last one (sent after the state change) has arrived."""
    deadline = time.monotonic() + 20
    while True:
        logs = run_children(api, run_id, "logs")
        lines = [log["message"] for log in logs]
        if any(log["message"].startswith("Finished in state") and not log["task_run_id"] for log in logs):
            return lines
        if time.monotonic() > deadline:
            return lines
        time.sleep(0.5)


def test_deploy_creates_one_scheduled_retrain_deployment(project, prefect_api, deployment):
    assert deployment["name"] == "retrain" and deployment["work_pool_name"] == "segflow"
    (schedule,) = deployment["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["active"]
    # Run controls only; hyperparameters stay in params.yaml.
    assert set(deployment["parameters"]) == {"root", "force", "stages", "retries", "register", "commit"}
    assert deployment["global_concurrency_limit"]["limit"] == 1, "at most one run at a time"
    pool = httpx.get(f"{prefect_api}/work_pools/segflow", timeout=10).json()
    assert pool["type"] == "process"
    gpu = httpx.get(f"{prefect_api}/v2/concurrency_limits/gpu", timeout=10).json()
    assert gpu["limit"] == 1


# Slow (about 13 s, make test-all): checks the documented CLI workaround, not segflow's own behaviour.
@pytest.mark.slow
def test_prefect_cli_listings_work_against_this_server(project, prefect_api, deployment):
    for args in (["deployment", "ls"], ["flow-run", "ls"], ["work-pool", "ls"], ["flow", "ls"], ["artifact", "ls"]):
        proc = subprocess.run(
            [str(BIN / "prefect"), *args], env=stage_env(PREFECT_API_URL=prefect_api), capture_output=True, text=True
        )
        assert proc.returncode == 0, f"prefect {' '.join(args)}: {proc.stdout}{proc.stderr}"
    listing = subprocess.run(
        [str(BIN / "prefect"), "deployment", "ls"], env=stage_env(PREFECT_API_URL=prefect_api), capture_output=True
    )
    assert b"retrain" in listing.stdout


def test_a_worker_runs_the_deployment_and_the_dashboard_gets_the_story(project, prefect_api, deployment, worker):
    run = _run_deployment(prefect_api, deployment)
    assert run["state_type"] == "COMPLETED", run["state"]["message"]
    tasks = run_children(prefect_api, run["id"], "task_runs")
    assert sorted(t["name"] for t in tasks) == ["augment", "evaluate", "export", "ingest", "register", "train"]
    lines = _lines(prefect_api, run["id"])
    assert any("epoch 1/1: train loss" in line and "val IoU" in line for line in lines), "training progress per epoch"
    assert not any(line.startswith(("To track the changes", "💡 Tip")) for line in lines), "advice and tips left out"
    artifacts = {a["key"]: a for a in run_children(prefect_api, run["id"], "artifacts") if a["key"]}
    metrics = json.loads((project / "data/evaluate/scores.json").read_text())
    table = artifacts["segflow-test-metrics"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert {row["class"]: row["iou"] for row in table} == metrics["iou"]["per_class"]
    summary = artifacts["segflow-pipeline-summary"]["data"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert f"git commit: `{commit}`" in summary and "params digest" in summary and "model md5" in summary
    assert "**Completed**: ran ingest, augment, train, export, evaluate." in summary
    assert "segflow-training-curves" in artifacts and "segflow-data-report" in artifacts
    progress = [a for a in run_children(prefect_api, run["id"], "artifacts") if a["type"] == "progress"]
    assert progress and progress[-1]["data"] == 100.0
    # The scheduled run registers its model: the first one becomes the production version.
    registration = artifacts["segflow-registration"]["data"]
    assert "`segflow-model@v0.1.0` registered and promoted to prod" in registration, registration
    tags = subprocess.run(["git", "tag"], cwd=project, capture_output=True, text=True).stdout.split()
    assert "segflow-model@v0.1.0" in tags and any(t.startswith("segflow-model#prod#") for t in tags)
    clean = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout
    assert clean == "", f"the run committed what it registered: {clean}"


def test_a_second_run_with_nothing_changed_skips_every_stage(project, prefect_api, deployment, worker):
    run = _run_deployment(prefect_api, deployment)
    assert run["state_type"] == "COMPLETED"
    lines = _lines(prefect_api, run["id"])
    assert sum("skipped: nothing it depends on changed" in line for line in lines) == 5
    assert not any(line.startswith("Running stage") for line in lines)
    summary = next(
        a for a in run_children(prefect_api, run["id"], "artifacts") if a["key"] == "segflow-pipeline-summary"
    )
    assert "**Nothing changed**" in summary["data"]
    assert any("nothing registered" in line and "already is this model" in line for line in lines), lines[-6:]


def test_a_failing_stage_fails_the_run_with_its_own_line_and_no_retry(project, prefect_api, deployment, worker):
    params = project / "params.yaml"
    before = params.read_bytes()
    params.write_text(
        yaml.safe_dump(merge(yaml.safe_load(before), {"train": {"encoder": "resnet19"}}), sort_keys=False)
    )
    try:
        run = _run_deployment(prefect_api, deployment)
    finally:
        params.write_bytes(before)
    assert run["state_type"] == "FAILED"
    message = run["state"]["message"]
    assert message.startswith("stage 'train' failed: train.encoder: unknown encoder 'resnet19'"), message
    assert "\n" not in message
    train = next(t for t in run_children(prefect_api, run["id"], "task_runs") if t["name"] == "train")
    assert train["state"]["message"] == message
    assert train["run_count"] == 1, "bad params are not retried"
    summary = next(
        a for a in run_children(prefect_api, run["id"], "artifacts") if a["key"] == "segflow-pipeline-summary"
    )
    assert "**Failed**: stage 'train' failed" in summary["data"] and "| evaluate | not run |" in summary["data"]


def test_the_server_points_its_dashboard_at_its_own_port(prefect_api):
    settings = httpx.get(prefect_api.removesuffix("/api") + "/ui-settings", timeout=10).json()
    assert settings["api_url"] == prefect_api
    assert "<html" in httpx.get(prefect_api.removesuffix("/api") + "/", timeout=10).text.lower()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium (see README, Operate)")
def test_the_dashboard_shows_the_stages_and_the_metrics(project, prefect_api, deployment, worker):
    from playwright.sync_api import sync_playwright

    runs = httpx.post(
        f"{prefect_api}/flow_runs/filter",
        json={"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}, "state": {"type": {"any_": ["COMPLETED"]}}}},
        timeout=10,
    ).json()
    run = next(r for r in runs if len(run_children(prefect_api, r["id"], "task_runs")) == 6)
    page_url = f"{prefect_api.removesuffix('/api')}/runs/flow-run/{run['id']}"
    registrations = httpx.post(
        f"{prefect_api}/artifacts/filter",
        json={"artifacts": {"key": {"any_": ["segflow-registration"]}}, "sort": "CREATED_DESC"},
        timeout=10,
    ).json()
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[*flags, "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(page_url, wait_until="networkidle", timeout=60_000)
            page.get_by_text("6 Task runs").first.wait_for(timeout=30_000)
            page.get_by_text("Task Runs", exact=True).click()
            for stage in ("ingest", "augment", "train", "export", "evaluate", "register"):
                page.get_by_text(stage, exact=True).first.wait_for(timeout=30_000)
            page.get_by_text("Artifacts", exact=True).click()
            page.get_by_text("segflow-test-metrics").first.wait_for(timeout=30_000)
            # Every registration outcome, one after the other, under its artifact key; each one readable.
            ui = prefect_api.removesuffix("/api")
            page.goto(f"{ui}/artifacts/key/segflow-registration", timeout=60_000)
            page.get_by_text("Model registration and the champion/challenger gate").first.wait_for(timeout=30_000)
            page.goto(f"{ui}/artifacts/artifact/{registrations[-1]['id']}", timeout=60_000)
            page.get_by_text("registered and promoted to prod").first.wait_for(timeout=30_000)
        except Exception:
            page.screenshot(path=str(project.parent / "dashboard-failed.png"), full_page=True)
            raise
        else:
            page.screenshot(path=str(project.parent / "dashboard.png"))
        finally:
            browser.close()
