"""Integration: the real pipeline in a temporary git + DVC project with a tiny configuration.

Runs in file order, on one project: a real ``dvc repro`` of all stages, then
``segflow run`` (the Prefect flow) against a real Prefect server on 127.0.0.1,
which must skip every stage and leave ``dvc.lock`` byte-identical, then a
params change that reruns only the stage it affects, then a failing stage.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from bench._util import merge
from segflow.ops.env import stage_env
from tests.conftest import copy_project, flow_run_named_in, run_children

STAGES = ["ingest", "augment", "train", "export", "evaluate"]
BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or stage_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], project, check=check)


def _ran(output: str) -> list[str]:
    """Stages a `dvc repro` / `segflow run` output says it ran."""
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def _set_params(project: Path, override: dict) -> None:
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), override), sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory, reproduced) -> Path:
    """A committed git + DVC project (this repo's code, dvc.yaml and DVC config, tiny params) after its first
    ``dvc repro``: a copy of the session's shared project, which ran every stage once."""
    return copy_project(reproduced.path, tmp_path_factory.mktemp("project") / "project")


# Credentials in the environment of every run here: none may show up in logs, artifacts or outputs.
CANARY = "segflow-canary-7f3a9c"
SECRETS = {"AWS_SECRET_ACCESS_KEY": CANARY, "PREFECT_API_KEY": CANARY + "-key", "HF_TOKEN": CANARY + "-hf"}


def _segflow(project: Path, api: str, *args: str) -> subprocess.CompletedProcess:
    env = stage_env(PREFECT_API_URL=api, **SECRETS)
    return _run([str(BIN / "segflow"), "--root", str(project), "run", *args], project, env, False)


def test_dvc_repro_runs_the_whole_pipeline_then_nothing(project, reproduced):
    # The first `dvc repro` of a fresh project (the shared one, of which `project` is a copy) ran every stage.
    assert _ran(reproduced.output) == STAGES, reproduced.output

    data = project / "data"
    manifest = data / "ingest" / "manifest.csv"
    assert manifest.is_file()
    for name in ("train.json", "eval.json", "preview.png"):
        assert (data / "augment" / name).is_file()
    assert {p.name for p in (data / "train" / "model").iterdir()} >= {"model.safetensors", "model.json"}
    metrics = json.loads((data / "evaluate" / "scores.json").read_text())
    assert set(metrics["iou"]["per_class"]) == {"background", "disk", "box", "triangle"}
    assert 0.0 <= metrics["iou"]["macro"] <= 1.0

    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)

    assert "up to date" in _dvc(project, "status").stdout
    second = _dvc(project, "repro")
    assert _ran(second.stdout) == [], second.stdout

    shown = json.loads(_dvc(project, "metrics", "show", "--json").stdout)
    # One revision (the workspace; DVC 3 keys it ""): the test scores, a table that fits a terminal.
    (workspace,) = (rev["data"] for rev in shown.values())
    assert set(workspace) == {"data/evaluate/metrics.json"}
    table = _dvc(project, "metrics", "show").stdout.splitlines()
    assert len(table) == 2 and max(len(line) for line in table) < 200, table
    _dvc(project, "plots", "show", "-o", str(project / "dvc_plots"))
    assert (project / "dvc_plots" / "index.html").is_file()


def test_flow_run_skips_unchanged_stages_and_leaves_the_same_lock(project, prefect_api):
    lock_before = (project / "dvc.lock").read_bytes()
    proc = _segflow(project, prefect_api)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _ran(proc.stdout + proc.stderr) == []
    assert (project / "dvc.lock").read_bytes() == lock_before
    assert "test IoU" in proc.stdout

    run = flow_run_named_in(proc.stdout + proc.stderr, prefect_api)
    assert run["state_type"] == "COMPLETED"
    tasks = run_children(prefect_api, run["id"], "task_runs")
    assert sorted(t["name"] for t in tasks) == sorted(STAGES)
    artifacts = [a for a in run_children(prefect_api, run["id"], "artifacts") if a["key"] == "segflow-test-metrics"]
    assert len(artifacts) == 1
    rows = artifacts[0]["data"]
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [row["class"] for row in rows] == ["background", "disk", "box", "triangle"]


def test_params_change_reruns_only_the_affected_stage(project, prefect_api):
    _set_params(project, {"evaluate": {"preview_samples": 3}})
    proc = _segflow(project, prefect_api)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _ran(proc.stdout + proc.stderr) == ["evaluate"]
    # The flow leaves the lock `dvc repro` would: nothing left to do.
    assert "up to date" in _dvc(project, "status").stdout


def test_switching_an_export_on_and_off_reruns_only_the_export_stage(project, prefect_api):
    pytest.importorskip("onnxruntime")
    from segflow.registry.fetch import load_model

    model = (project / "data/train/model/model.safetensors").read_bytes()
    _set_params(project, {"export": {"formats": ["onnx"]}})
    status = _dvc(project, "status", "--json").stdout
    assert set(json.loads(status)) == {"export"}, status  # train (and evaluate) unchanged
    proc = _segflow(project, prefect_api)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _ran(proc.stdout + proc.stderr) == ["export"]
    assert (project / "data/train/model/model.safetensors").read_bytes() == model
    card = json.loads((project / "data/export/model.json").read_text())
    assert card["exports"]["onnx"]["max_abs_logit_diff"] < 1e-3
    # The workspace's model folder finds its export beside it.
    image = (np.arange(96 * 96 * 3) % 251).astype(np.uint8).reshape(96, 96, 3)
    torch_model = load_model(str(project / "data/train/model"), project)
    onnx_model = load_model(str(project / "data/train/model"), project, backend="onnx")
    assert np.abs(torch_model.logits(image) - onnx_model.logits(image)).max() < 1e-3
    _set_params(project, {"export": {"formats": []}})
    proc = _dvc(project, "repro")  # the same stages without Prefect: back to the earlier export
    # DVC's run cache may hand the earlier export back without running the stage.
    assert _ran(proc.stdout) in ([], ["export"]), proc.stdout
    assert not (project / "data/export/model.onnx").exists()
    assert "up to date" in _dvc(project, "status").stdout


def test_failing_stage_stops_the_flow_with_its_one_line_error(project, prefect_api):
    params = project / "params.yaml"
    original = params.read_bytes()
    model = (project / "data/train/model/model.safetensors").read_bytes()
    try:
        _set_params(project, {"train": {"encoder": "resnet19"}})
        proc = _segflow(project, prefect_api)
    finally:
        params.write_bytes(original)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("segflow: error: stage 'train' failed"), proc.stderr
    assert "resnet19" in error
    assert "Running stage 'evaluate'" not in proc.stdout + proc.stderr
    # The failed stage put the last good model back: with the params as they were, nothing is stale.
    assert (project / "data/train/model/model.safetensors").read_bytes() == model
    assert "up to date" in _dvc(project, "status").stdout


def test_no_credential_reaches_logs_artifacts_or_outputs(project, prefect_api):
    # Every segflow run of this module (a no-op, a rerun of evaluate, a failing train) had them in its env.
    proc = _segflow(project, prefect_api)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = [("terminal", proc.stdout + proc.stderr)]
    for kind in ("logs", "artifacts", "flow_runs", "task_runs"):
        offset = 0
        while page := httpx.post(f"{prefect_api}/{kind}/filter", json={"offset": offset}, timeout=10).json():
            seen.append((kind, json.dumps(page)))
            offset += len(page)
    for path in (project / "data").rglob("*"):
        if path.is_file():
            seen.append((str(path), path.read_bytes().decode("latin-1")))
    assert [where for where, text in seen if CANARY in text] == []
    assert len(seen) > 20
