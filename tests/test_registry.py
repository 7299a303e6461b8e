"""The registry end to end: real git tags (GTO), a local-folder DVC remote, the gate, cards, predict, ONNX.

One project, three trainings in file order: a weak first model (goes to prod because nothing is there),
a better one with an ONNX export (promoted), a worse one (registered, not promoted).
"""

from __future__ import annotations

import hashlib
import json
import shutil
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
from segflow.params import load_params
from segflow.registry import register, rescore
from segflow.registry.fetch import fetch, fetch_export, load_model, resolve, versions
from segflow.registry.gate import fair_champion
from segflow.semantic.evaluate import score_model
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
    outcome = _train(project, {"train": {"epochs": 6, "lr": 0.003}, "export": {"formats": ["onnx"]}})
    assert outcome["registered"] and outcome["version"] == "v0.1.1"
    assert outcome["candidate"] >= outcome["champion"] + 0.005, outcome
    assert outcome["promoted"] and outcome["champion_version"] == "v0.1.0"
    assert resolve(project, "segflow-model#prod").version == "v0.1.1"


def test_a_worse_model_is_registered_but_not_promoted(project):
    outcome = _train(project, {"train": {"epochs": 1, "lr": 0.0001}, "export": {"formats": []}})
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
    # v0.1.2 (the workspace's) has no export: v0.1.1's came through DVC, checked against its registry card.
    folder = fetch_export(project, resolve(project, "segflow-model@v0.1.1"))
    assert folder.is_relative_to(project / ".segflow/models")
    card = json.loads((folder / "model.json").read_text())
    assert card["exports"]["onnx"]["max_abs_logit_diff"] < 1e-3
    registered = json.loads(_git(project, "show", "segflow-model@v0.1.1:registry/segflow-model/card.json"))
    assert registered["exports"]["onnx"]["sha256"] == card["exports"]["onnx"]["sha256"]
    with pytest.raises(SegflowError, match=r"v0.1.2 was registered without a onnx export"):
        load_model("segflow-model@v0.1.2", project, backend="onnx")


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


def test_a_tampered_workspace_model_is_refused_and_the_registry_falls_back_to_dvcs_copy(project, images, tmp_path):
    weights = project / "data/train/model/model.safetensors"
    original = weights.read_bytes()
    weights.unlink()  # the workspace file may be a link into DVC's cache: never write through it
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        with pytest.raises(SegflowError) as refused:
            load_model(str(weights.parent), project)
        by_version = _segflow(
            project, "predict", str(images / "scene_0.png"), "--model", "segflow-model@v0.1.2", "--out", str(tmp_path)
        )
    finally:
        weights.unlink()
        weights.write_bytes(original)
    assert str(refused.value) == (
        f"{weights}: its sha256 does not match {weights.parent / 'model.json'} (the file was changed after "
        f"training); refusing to load it: dvc checkout {weights.parent} puts back a pipeline's model, and segflow "
        "predict --model NAME@VERSION fetches a registered one"
    )
    # By version, the workspace copy is not the registered one: DVC's cached copy is used instead, and said so.
    assert by_version.returncode == 0, by_version.stderr
    assert "dvc checkout data/train/model restores the workspace" in by_version.stderr
    assert (tmp_path / "scene_0.png").is_file()


def test_weights_swapped_in_dvcs_cache_are_refused_against_the_tags_card(project, images):
    # Another version's model.json and weights put in DVC's cache under v0.1.1's hashes: DVC hands them back,
    # their card agrees with them, and only the card committed in git with v0.1.1's tag tells.
    from segflow.io import sha256_file

    genuine = fetch(project, resolve(project, "segflow-model@v0.1.1"))
    other = fetch(project, resolve(project, "segflow-model@v0.1.0"))
    cache = project / ".dvc/cache/files/md5"
    swapped = []
    for name in ("model.safetensors", "model.json"):
        digest = hashlib.md5((genuine / name).read_bytes()).hexdigest()
        entry = cache / digest[:2] / digest[2:]
        swapped.append((entry, entry.read_bytes()))
        entry.chmod(0o644)
        entry.write_bytes((other / name).read_bytes())
    shutil.rmtree(genuine)  # the fetched copy: the next fetch reads DVC's cache again
    try:
        with pytest.raises(SegflowError) as refused:
            load_model("segflow-model@v0.1.1", project)
    finally:
        for entry, data in swapped:
            entry.write_bytes(data)
    message = str(refused.value)
    assert message.startswith("segflow-model@v0.1.1: the weights DVC returned have sha256 ")
    assert sha256_file(other / "model.safetensors") in message and "\n" not in message
    assert _card_at(project, "segflow-model@v0.1.1")["weights_sha256"] in message
    assert fetch(project, resolve(project, "segflow-model@v0.1.1")).is_dir(), "the genuine bytes fetch again"


def _card_at(project: Path, tag: str) -> dict:
    return json.loads(_git(project, "show", f"{tag}:registry/segflow-model/card.json"))


def test_an_unchanged_split_keeps_the_champions_own_score(project):
    # v0.1.2 was compared with v0.1.1 on the same data: nothing to re-score, and the card says which split.
    card = _card_at(project, "segflow-model@v0.1.2")
    gate = card["registration"]["gate"]
    assert gate["champion"] == "v0.1.1" and not gate["rescored"] and gate["split_change"] is None
    assert card["test_split"] == _card_at(project, "segflow-model@v0.1.1")["test_split"]
    assert card["test_split"]["images"] == card["test"]["images"] and not card["test_split"]["frozen"]
    assert not (project / ".segflow/rescore").exists()


def test_when_the_test_split_grows_the_champion_is_rescored_on_it(project):
    # New data (a scheduled retrain's reason to exist): the hashed-id split puts some of it in test.
    outcome = _train(project, {"ingest": {"synthetic": {"num_images": 40}}, "train": {"epochs": 1, "lr": 0.0001}})
    assert outcome["registered"] and outcome["version"] == "v0.1.3" and outcome["champion_version"] == "v0.1.1"
    assert outcome["rescored"] and not outcome["rescore_cached"]
    assert outcome["split"]["change"].endswith("images added") and outcome["split"]["images"] > 4
    assert f"test split changed since v0.1.1: {outcome['split']['change']}" in outcome["reason"]
    # The champion's number is its score on *this* split, by the evaluate stage's own evaluator.
    params = load_params(project / "params.yaml")
    champion = fetch(project, resolve(project, "segflow-model@v0.1.1"))
    on_this_split = score_model(champion, params, params.paths.under(project))
    assert outcome["champion"] == on_this_split["iou"]["macro"] != outcome["champion_own"]
    assert not outcome["promoted"], "the weak model loses against the champion on the same images"
    info = json.loads(_git(project, "for-each-ref", "refs/tags/segflow-model@v0.1.3", "--format=%(contents)"))
    assert info["champion_rescored"] and info["test_split_sha256"] == outcome["split"]["sha256"]
    assert "re-scored" in (project / "registry/segflow-model/card.md").read_text()


def _killed_at(project: Path, point: str) -> None:
    """``segflow register --commit --allow-dirty``, SIGKILLed by its fault point ``point``."""
    proc = subprocess.run(
        [str(BIN / "segflow"), "register", "--commit", "--allow-dirty"],
        cwd=project,
        env=stage_env(SEGFLOW_FAULT=f"register:{point}"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr


def test_a_better_model_on_the_changed_split_is_promoted_though_its_registration_is_killed_twice(project):
    """The better candidate's registration is SIGKILLed after its card commit, then again after its version tag
    (no stage tag yet): the next `segflow register` completes it, and the outcome is the gate's."""
    # More optimiser steps than the champion had (batch 2, more data), for a clear win at a small cost.
    _set(project, {"train": {"epochs": 6, "batch_size": 2, "lr": 0.003}})
    _dvc(project, "repro")
    code = project / "flows/pipeline.py"  # uncommitted code: refused, unless allowed (and then recorded)
    code.write_text(code.read_text() + "\n# a local experiment\n")
    with pytest.raises(SegflowError, match=r"uncommitted changes to flows/pipeline.py: .* --allow-dirty"):
        register.register(project, commit=True)
    rescored = sorted((project / ".segflow/rescore").rglob("*.json"))

    _killed_at(project, "after-commit")
    assert "segflow-model@v0.1.4" not in _git(project, "tag").split()
    assert _git(project, "log", "-1", "--format=%s").startswith("Register segflow-model v0.1.4")
    _killed_at(project, "after-version")  # the rerun tags v0.1.4 from the committed card, then dies
    tags = set(_git(project, "tag").split())
    at_commit = _git(project, "tag", "--points-at", "segflow-model@v0.1.4^{commit}").split()
    assert "segflow-model@v0.1.4" in tags and not any(t.startswith("segflow-model#prod") for t in at_commit)

    done = _segflow(project, "register", "--allow-dirty")
    code.write_text(code.read_text().removesuffix("\n# a local experiment\n"))
    assert done.returncode == 0, done.stderr
    assert "completed an interrupted registration: assigned prod to segflow-model@v0.1.4" in done.stderr
    assert "v0.1.4 already is this model" in done.stdout
    info = _card_at(project, "segflow-model@v0.1.4")["tag_message"]
    assert info["promoted_to"] == "prod" and info["champion"] == "v0.1.1" and info["champion_rescored"]
    assert info["metric_value"] >= info["champion_score"] + 0.005, info
    assert sorted((project / ".segflow/rescore").rglob("*.json")) == rescored, "same champion, same split: cached"
    assert resolve(project, "segflow-model#prod").version == "v0.1.4"
    assert info["dirty"] == ["flows/pipeline.py"]
    # Consistent: every version tag points at a commit holding its own card; GTO and segflow agree.
    for version in versions(project, "segflow-model"):
        assert _card_at(project, f"segflow-model@{version.version}")["version"] == version.version
    assert {v.version: v.stages for v in versions(project, "segflow-model")}["v0.1.4"] == ("prod",)
    assert len(_git(project, "log", "--format=%H", "--grep", "Register segflow-model v0.1.4").split()) == 1
    # Lineage: the source commit holds the dvc.lock of the model it names.
    lock = yaml.safe_load(_git(project, "show", f"{info['source_commit']}:dvc.lock"))
    (model,) = [o for o in lock["stages"]["train"]["outs"] if o["path"] == "data/train/model"]
    assert model["md5"] == info["model_md5"]


def test_rescore_off_compares_with_the_champions_own_split_and_says_so(project):
    params = load_params(project / "params.yaml")
    params = params.model_copy(update={"register": params.register.model_copy(update={"rescore": False})})
    # v0.1.4 holds prod, scored on the current split; a split it was not scored on (another hash):
    split = rescore.test_split(project, params) | {"sha256": "0" * 64}
    fair = fair_champion(project, params, split)
    assert fair["version"] == "v0.1.4" and not fair["rescored"] and fair["score"] == fair["own_score"]
    assert "is from its own split (register.rescore: false)" in fair["note"]


def test_a_second_register_at_once_gets_one_line(project):
    from segflow.proc import exclusive

    with exclusive(project / register.LOCK_FILE):
        proc = _segflow(project, "register")
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"segflow: error: {project}: another segflow register is registering in this repository")
