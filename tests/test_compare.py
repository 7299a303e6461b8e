"""segflow compare: DVC experiments queued per combination, run, and tabulated."""

from __future__ import annotations

import json
import subprocess

import dvc.api
import pandas as pd
import pytest
import yaml

from bench._util import fresh_project
from segflow.errors import SegflowError
from segflow.ops.compare import compare, plan
from segflow.ops.env import stage_env
from segflow.params import load_params
from segflow.semantic import factory
from tests.conftest import TINY


def test_plan_checks_every_combination_before_queueing_any(tmp_path):
    project = fresh_project(tmp_path / "project", TINY)
    combos = plan(project, ["FCN", "Unet"], ["resnet18", "mobilenet_v2"], ["dice_ce"], ["train.epochs=2"], "tiny")
    assert [(c.arch, c.encoder) for c in combos] == [
        ("FCN", "resnet50"),
        ("Unet", "resnet18"),
        ("Unet", "mobilenet_v2"),
    ]
    fcn = dict(combos[0].sets)
    assert fcn["train.decoder_channels"] == "null" and fcn["train.epochs"] == "2"
    assert "train.decoder_channels" not in dict(combos[1].sets)  # Unet keeps params.yaml's widths
    assert combos[0].name == "tiny-FCN-resnet50-dice_ce"

    with pytest.raises(SegflowError, match=r"Unet / resnet181 / dice_ce: .*unknown encoder 'resnet181'; did you mean"):
        plan(project, ["Unet"], ["resnet181"], ["dice_ce"], [], "tiny")
    with pytest.raises(SegflowError, match=r"train.loss: Input should be"):
        plan(project, ["Unet"], ["resnet18"], ["dicece"], [], "tiny")
    with pytest.raises(SegflowError, match=r"--set epochs: give key=value"):
        plan(project, ["Unet"], ["resnet18"], ["ce"], ["epochs"], "tiny")


def test_compare_queues_runs_and_tabulates_two_architectures(tmp_path):
    """Two real DVC experiments (Unet and our SegNet) through the queue; the table agrees with `dvc exp show`."""
    project = fresh_project(tmp_path / "project", TINY)
    params_before = (project / "params.yaml").read_text()
    md, csv, rows = compare(
        project,
        ["Unet", "SegNet"],
        ["resnet18"],
        ["dice_ce"],
        [],
        jobs=2,  # two queue workers: start-ups overlap (this test reads no timings)
        command="segflow compare --archs Unet,SegNet",
    )
    assert [r["status"] for r in rows] == ["done", "done"], rows
    assert (project / "params.yaml").read_text() == params_before, "experiments run apart from the workspace"

    shown = json.loads(
        subprocess.run(
            ["dvc", "exp", "show", "--json"], cwd=project, env=stage_env(), capture_output=True, text=True, check=True
        ).stdout
    )
    runs = {rev["name"]: rev for base in shown for exp in base.get("experiments") or [] for rev in exp["revs"]}
    assert set(runs) == {"synthetic-Unet-resnet18-dice_ce", "synthetic-SegNet-vgg16_bn-dice_ce"}

    table = pd.read_csv(csv).set_index("experiment")
    base = load_params(project / "params.yaml")
    for name, run in runs.items():
        scores = json.loads(dvc.api.read("data/evaluate/scores.json", repo=str(project), rev=run["rev"]))
        row = table.loc[name]
        assert row["iou_macro"] == pytest.approx(scores["iou"]["macro"])
        assert row["iou_triangle"] == pytest.approx(scores["iou"]["per_class"]["triangle"])
        ran = yaml.safe_load(json.dumps(run["data"]["params"]["params.yaml"]["data"]))
        model = factory.build(base.train.model_copy(update=ran["train"]), len(base.classes), in_channels=3)
        assert row["parameters"] == sum(p.numel() for p in model.parameters())
        assert row["gmacs"] > 0 and row["train_s"] > 0 and row["infer_images_per_s"] > 0
    text = md.read_text()
    assert "segflow compare --archs Unet,SegNet" in text and "| synthetic-SegNet-vgg16_bn-dice_ce |" in text


def _instance_project(tmp_path):
    from segflow.config import set_params
    from tests.test_instance_pipeline import INSTANCE_TINY

    project = fresh_project(tmp_path / "project")
    set_params(project, INSTANCE_TINY, "an instance comparison")
    subprocess.run(["git", "commit", "-qam", "task: instance"], cwd=project, env=stage_env(), check=True)
    return project


def test_instance_plan_is_one_experiment_per_backbone(tmp_path):
    project = _instance_project(tmp_path)
    combos = plan(project, ["MaskRCNN"], ["resnet18", "mobilenet_v3_large", "resnet18"], ["-"], [], "tiny")
    assert [(c.name, dict(c.sets)) for c in combos] == [
        ("tiny-MaskRCNN-resnet18", {"train.encoder": "resnet18"}),
        ("tiny-MaskRCNN-mobilenet_v3_large", {"train.encoder": "mobilenet_v3_large"}),
    ]
    with pytest.raises(SegflowError, match=r"task: instance trains MaskRCNN only"):
        plan(project, ["Unet"], ["resnet18"], ["-"], [], "tiny")
    with pytest.raises(SegflowError, match=r"MaskRCNN / resnet101: .*train.encoder"):
        plan(project, ["MaskRCNN"], ["resnet101"], ["-"], [], "tiny")


@pytest.mark.slow
def test_compare_tabulates_instance_backbones_from_their_experiments(tmp_path):
    project = _instance_project(tmp_path)
    md, csv, rows = compare(
        project, ["MaskRCNN"], ["resnet18", "mobilenet_v3_large"], ["-"], [], jobs=2, command="segflow compare"
    )
    assert [r["status"] for r in rows] == ["done", "done"], rows
    table = pd.read_csv(csv).set_index("experiment")
    for name in ("synthetic-MaskRCNN-resnet18", "synthetic-MaskRCNN-mobilenet_v3_large"):
        rev = table.loc[name, "rev"]
        scores = json.loads(dvc.api.read("data/evaluate/scores.json", repo=str(project), rev=str(rev)))
        assert table.loc[name, "segm_map"] == pytest.approx(scores["segm"]["map"])
        assert table.loc[name, "count_mae"] == pytest.approx(scores["counts"]["mean_abs_count_error"])
        assert table.loc[name, "parameters"] > 0 and table.loc[name, "train_s"] > 0
    assert "| mask AP | AP50 | box AP | count error |" in md.read_text()
