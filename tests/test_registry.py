"""The registry end to end: real git tags (GTO), a local-folder DVC remote, the gate, cards, predict, ONNX.

One project, three trainings in file order: a weak first model (goes to prod because nothing is there),
a better one with an ONNX export (promoted), a worse one (registered, not promoted).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from bench._util import merge
from segflow.data.synthetic import make_scene
from segflow.errors import SegflowError
from segflow.ops.env import stage_env
from segflow.registry import register
from segflow.registry.fetch import fetch, load_model, resolve, versions
from tests.conftest import copy_project
from tests.test_pipeline import _dvc

BIN = Path(sys.executable).parent
pytest.importorskip("onnxruntime")


def _git(project: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=project, env=stage_env(), capture_output=True, text=True, check=True
    ).stdout


def _set(project: Path, override: dict) -> None:
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), override), sort_keys=False))


def _train(project: Path, override: dict) -> dict:
    _set(project, override)
    _dvc(project, "repro")
    return register.register(project, commit=True)


def _segflow(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "segflow"), *args], cwd=project, env=stage_env(), capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory, reproduced) -> Path:
    """A copy of the session's reproduced tiny project, set to train a weak first model (so later ones beat it):
    ingest and augment stay as they are, train and evaluate are stale."""
    base = tmp_path_factory.mktemp("registry")
    project = copy_project(reproduced.path, base / "project")
    _set(project, {"train": {"epochs": 1, "lr": 0.0001}})
    _dvc(project, "remote", "add", "-d", "local", str(base / "remote"))
    _git(project, "commit", "-qam", "DVC remote")
    return project


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    for index, size in enumerate((48, 150, 600)):
        image, _ = make_scene(np.random.default_rng(index), size, 3, np.array([0.4, 0.3, 0.3]), 1, 4, 0.05)
        Image.fromarray(image).save(folder / f"scene_{index}.png")
    (folder / "readme.png").write_text("not an image")
    return folder


def test_a_stale_or_uncommitted_pipeline_is_refused(project):
    with pytest.raises(SegflowError, match=r"the pipeline is not up to date \(dvc status: .*\); run segflow run"):
        register.register(project)
    _dvc(project, "repro")
    with pytest.raises(SegflowError, match=r"uncommitted pipeline results .*dvc.lock.*register.commit: true"):
        register.register(project, commit=False)
    readme = project / ".gitignore"
    readme.write_text(readme.read_text() + "\n# a local change\n")
    try:
        with pytest.raises(SegflowError, match=r"uncommitted changes to \.gitignore: commit them"):
            register.register(project, commit=True)
    finally:
        _git(project, "checkout", "--", ".gitignore")


def test_the_first_version_goes_to_prod(project):
    outcome = register.register(project, commit=True)
    assert outcome["registered"] and outcome["promoted"] and outcome["version"] == "v0.1.0"
    assert outcome["reason"] == "nothing holds the stage yet"
    assert set(_git(project, "tag").split()) == {"segflow-model@v0.1.0", "segflow-model#prod#1"}
    assert _git(project, "status", "--porcelain", "--untracked-files=no") == "", "results and card committed"
    card = json.loads((project / "registry/segflow-model/card.json").read_text())
    assert card["version"] == "v0.1.0" and card["architecture"]["arch"] == "Unet"
    assert set(card["test"]["iou"]["per_class"]) == {"background", "disk", "box", "triangle"}
    assert card["data"]["ingest_md5"] and card["registration"]["source_commit"]
    assert "## Test scores" in (project / "registry/segflow-model/card.md").read_text()
    info = json.loads(_git(project, "for-each-ref", "refs/tags/segflow-model@v0.1.0", "--format=%(contents)"))
    assert info["metric"] == "iou.macro" and info["metric_value"] == outcome["candidate"]
    assert any((Path(project).parent / "remote").rglob("*")), "pushed to the DVC remote"


def test_an_unchanged_model_is_not_registered_again(project):
    outcome = register.register(project, commit=True)
    assert not outcome["registered"] and "v0.1.0 already is this model" in outcome["reason"]


def test_a_better_model_is_promoted(project):
    outcome = _train(project, {"train": {"epochs": 6, "lr": 0.003}, "register": {"export": ["onnx"]}})
    assert outcome["registered"] and outcome["version"] == "v0.1.1"
    assert outcome["candidate"] >= outcome["champion"] + 0.005, outcome
    assert outcome["promoted"] and outcome["champion_version"] == "v0.1.0"
    assert resolve(project, "segflow-model#prod").version == "v0.1.1"


def test_a_worse_model_is_registered_but_not_promoted(project):
    outcome = _train(project, {"train": {"epochs": 1, "lr": 0.0001}, "register": {"export": []}})
    assert outcome["registered"] and not outcome["promoted"] and outcome["version"] == "v0.1.2"
    assert outcome["champion_version"] == "v0.1.1" and outcome["candidate"] < outcome["champion"] + 0.005
    assert "not better by at least 0.005" in outcome["reason"]
    stages = {v.version: v.stages for v in versions(project, "segflow-model")}
    assert stages == {"v0.1.2": (), "v0.1.1": ("prod",), "v0.1.0": ()}
    listing = _segflow(project, "models")
    assert listing.returncode == 0 and "v0.1.1     prod" in listing.stdout


def test_predict_by_version_and_by_stage(project, images, tmp_path):
    prod = _segflow(project, "predict", str(images), "--model", "segflow-model#prod", "--out", str(tmp_path / "prod"))
    assert prod.returncode == 3, prod.stderr  # one input is not an image: the others are still written
    assert f"{images / 'readme.png'}: not an image file; skipped" in prod.stderr
    assert sorted(p.name for p in (tmp_path / "prod").iterdir()) == ["scene_0.png", "scene_1.png", "scene_2.png"]
    by_version = _segflow(
        project, "predict", str(images / "scene_1.png"), "--model", "segflow-model@v0.1.1", "--out", str(tmp_path / "v")
    )
    assert by_version.returncode == 0, by_version.stderr
    assert (tmp_path / "prod/scene_1.png").read_bytes() == (tmp_path / "v/scene_1.png").read_bytes()
    # v0.1.1 is not the workspace's model (v0.1.2 is): it was fetched by version through DVC.
    assert fetch(project, resolve(project, "segflow-model@v0.1.1")).is_relative_to(project / ".segflow/models")
    image = np.asarray(Image.open(images / "scene_1.png"))
    mask = np.asarray(Image.open(tmp_path / "prod/scene_1.png"))
    assert np.array_equal(load_model("segflow-model#prod", project).predict(image), mask), "the Python API agrees"


def test_onnx_and_pytorch_agree(project, images):
    image = np.asarray(Image.open(images / "scene_1.png"))
    torch_model = load_model("segflow-model@v0.1.1", project)
    onnx_model = load_model("segflow-model@v0.1.1", project, backend="onnx")
    assert np.abs(torch_model.logits(image) - onnx_model.logits(image)).max() < 1e-3
    assert (torch_model.predict(image) == onnx_model.predict(image)).mean() > 0.999
    card = json.loads((fetch(project, resolve(project, "segflow-model@v0.1.1")) / "model.json").read_text())
    assert card["exports"]["onnx"]["max_abs_logit_diff"] < 1e-3


def test_tiled_and_whole_masks_of_a_trained_model_agree(project, images):
    image = np.asarray(Image.open(images / "scene_2.png"))  # 600 x 600: nine 256-pixel tiles
    model = load_model("segflow-model@v0.1.1", project)
    model.tile_size, model.overlap = 1024, 0
    whole = model.predict(image)
    model.tile_size, model.overlap = 256, 128
    tiled = model.predict(image)
    assert (whole == tiled).mean() >= 0.99


def test_dvc_artifacts_get_fetches_a_version(project, tmp_path):
    proc = _dvc(
        project, "artifacts", "get", str(project), "segflow-model", "--rev", "v0.1.0", "-o", str(tmp_path / "m")
    )
    assert proc.returncode == 0
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"model.safetensors", "model.json"}


def test_a_tampered_weights_file_is_refused(project, images, tmp_path):
    weights = project / "data/train/model/model.safetensors"
    original = weights.read_bytes()
    weights.unlink()  # the workspace file may be a link into DVC's cache: never write through it
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        proc = _segflow(
            project, "predict", str(images / "scene_0.png"), "--model", "segflow-model@v0.1.2", "--out", str(tmp_path)
        )
    finally:
        weights.unlink()
        weights.write_bytes(original)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"segflow: error: {weights}: its sha256 does not match {weights.parent / 'model.json'} (the file was "
        "changed after training); refusing to load it: fetch the model again (segflow predict fetches it from "
        "the registry)"
    )
