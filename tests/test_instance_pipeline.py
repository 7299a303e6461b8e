"""task: instance end to end: a real ``dvc repro`` of the five stages on tiny synthetic scenes (Mask R-CNN on a
narrow ResNet-18 FPN, one epoch), then what the stages wrote, checked against each other."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bench._util import fresh_project
from segflow.config import set_params
from segflow.ops.env import stage_env

#: A tiny instance configuration: 24 scenes of 64 px, a 32-wide Mask R-CNN, one epoch on the CPU.
INSTANCE_TINY = {
    "task": "instance",
    "seed": 3,
    "classes": ["disk", "box", "triangle"],
    "background": None,
    "ingest": {
        "workers": 1,
        "val_fraction": 0.2,
        "test_fraction": 0.25,
        "synthetic": {"num_images": 24, "image_size": 64, "min_objects": 2, "max_objects": 4},
    },
    "augment": {"crop_size": 64, "preview_samples": 2, "min_instance_area": 6},
    "train": {
        "arch": "MaskRCNN",
        "encoder": "resnet18",
        "width": 32,
        "rois_per_image": 64,
        "epochs": 1,
        "batch_size": 4,
        "accelerator": "cpu",
        "val_detections": 20,
    },
    "evaluate": {"preview_samples": 2},
    "predict": {"max_detections": 20},
    "register": {"metric": "segm.map"},
}


def _segflow(project, *args: str) -> subprocess.CompletedProcess:
    """The installed ``segflow`` command (the venv's when the suite runs from the repository's)."""
    from tests.conftest import ROOT

    segflow = ROOT / ".venv" / "bin" / "segflow"
    command = [str(segflow if segflow.exists() else "segflow"), *args]
    return subprocess.run(command, cwd=project, env=stage_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = fresh_project(tmp_path_factory.mktemp("instance") / "project")
    changed = set_params(project, INSTANCE_TINY, "the instance test")
    assert "-train.encoder_depth" in changed  # switching task removed the semantic-only keys
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=project, env=stage_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return project


def test_ingest_stores_objects_as_instance_ids(project):
    ingest = project / "data" / "ingest"
    table = (ingest / "instances.csv").read_text().splitlines()
    assert table[0] == "id,instance,class,crowd,area,x0,y0,x1,y1"
    first = table[1].split(",")
    with Image.open(ingest / "masks" / f"{first[0]}.png") as img:
        assert img.mode == "I;16"
        ids = np.asarray(img)
    # The table's area and box are those of the pixels holding the object's id.
    ys, xs = np.nonzero(ids == int(first[1]))
    assert int(first[4]) == len(ys) and [int(v) for v in first[5:]] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    report = json.loads((ingest / "report.json").read_text())
    assert set(report["splits"]["train"]["objects"]) == {"disk", "box", "triangle"}


def test_metrics_are_coco_ap_counts_and_pixel_scores(project):
    metrics = json.loads((project / "data" / "evaluate" / "metrics.json").read_text())
    assert set(metrics) == {"images", "segm", "bbox", "iou", "dice", "count"}
    assert set(metrics["segm"]) == {"map", "map_50", "map_75"}
    for value in (metrics["segm"]["map"], metrics["bbox"]["map"], metrics["iou"]["macro"]):
        assert 0.0 <= value <= 1.0
    scores = json.loads((project / "data" / "evaluate" / "scores.json").read_text())
    assert scores["images"] == metrics["images"] == len(scores["counts"]["per_image"])
    assert len(scores["split_sha256"]) == 64
    confusion = np.asarray(scores["confusion"]["counts"])
    # Every true object is matched or missed exactly once: the rows (but none) sum to the true counts.
    assert confusion[:3].sum() == scores["counts"]["true_total"]
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "metrics", "show"], cwd=project, env=stage_env(), capture_output=True, text=True
    )
    assert shown.returncode == 0 and "segm.map" in shown.stdout
    assert max(len(line) for line in shown.stdout.splitlines()) < 200


def test_model_card_and_export_say_instance(project):
    card = json.loads((project / "data" / "train" / "model" / "model.json").read_text())
    assert card["task"] == "instance" and card["arch"] == "MaskRCNN" and card["classes"] == ["disk", "box", "triangle"]
    assert card["min_size"] is None and card["width"] == 32  # no rescaling (torchvision's 800 px)
    exported = json.loads((project / "data" / "export" / "model.json").read_text())
    assert exported["weights_sha256"] == card["weights_sha256"]
    live = json.loads((project / "data" / "train" / "live" / "metrics.json").read_text())
    assert live["epoch"] == 1 and "loss_mask" in json.dumps(live)


def test_what_is_scored_is_what_predict_gives(project, monkeypatch):
    # The predictor segflow predict uses, run here over the test split and scored again, gives the
    # stage's mask AP exactly.
    from segflow.instance import metrics as scoring
    from segflow.instance.dataset import objects_by_image
    from segflow.instance.evaluate import truth_of
    from segflow.instance.infer import Predictor
    from segflow.io import read_image, read_instances
    from segflow.layout import read_instance_table, read_manifest, split_rows

    monkeypatch.chdir(project)
    ingest = project / "data" / "ingest"
    predictor = Predictor(project / "data" / "train" / "model", 20, 0.05, 0.5)
    objects = objects_by_image(read_instance_table(ingest), predictor.classes)
    truths, preds = [], []
    for row in split_rows(read_manifest(ingest), "test").itertuples():
        (found,) = predictor([read_image(ingest / row.image)])
        preds.append(found.as_prediction(row.id))
        truths.append(truth_of(row.id, read_instances(ingest / row.mask), objects.get(row.id, {})))
    again = scoring.evaluate(truths, preds, predictor.classes, max_dets=20)
    scores = json.loads((project / "data" / "evaluate" / "scores.json").read_text())
    assert again["segm"]["map"] == pytest.approx(scores["segm"]["map"], abs=1e-12)
    assert again["counts"]["pred_total"] == scores["counts"]["pred_total"]


def test_a_semantic_key_is_refused_by_name_under_task_instance(project):
    from segflow.errors import SegflowError

    with pytest.raises(SegflowError, match=r"train\.encoder_depth does not apply to task: instance"):
        set_params(project, {"train": {"encoder_depth": 4}}, "a semantic key")


def test_an_instance_model_registers_and_the_gate_reads_mask_ap(project):
    proc = _segflow(project, "register", "--commit")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    tags = subprocess.run(["git", "tag"], cwd=project, capture_output=True, text=True).stdout.split()
    assert "segflow-model@v0.0.1" in tags or any(t.startswith("segflow-model@v") for t in tags)
    assert "segm.map" in proc.stdout + proc.stderr


def test_predict_by_prod_writes_ids_and_coco_json_that_score_as_the_stage(project, tmp_path):
    # After registration (the first version is promoted): segflow predict --model segflow-model#prod on the
    # test images; its COCO results JSON, scored against the stored truth, gives the evaluate stage's AP.
    from segflow.instance import metrics as scoring
    from segflow.instance.dataset import objects_by_image
    from segflow.instance.evaluate import truth_of
    from segflow.io import read_instances
    from segflow.layout import read_instance_table, read_manifest, split_rows

    ingest = project / "data" / "ingest"
    rows = split_rows(read_manifest(ingest), "test")
    images = tmp_path / "images"
    images.mkdir()
    for row in rows.itertuples():
        (images / f"{row.id}.png").write_bytes((ingest / row.image).read_bytes())
    out = tmp_path / "out"
    proc = _segflow(project, "predict", str(images), "--out", str(out), "--overlay", "--model", "segflow-model#prod")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    objects = objects_by_image(read_instance_table(ingest), ["disk", "box", "triangle"])
    truths = [truth_of(r.id, read_instances(ingest / r.mask), objects.get(r.id, {})) for r in rows.itertuples()]
    results = []
    for row in rows.itertuples():
        with Image.open(out / f"{row.id}.png") as img:
            assert img.mode == "I;16" and img.size == (row.width, row.height)
        assert (out / f"{row.id}_overlay.png").is_file()
        entries = json.loads((out / f"{row.id}.json").read_text())
        assert all(e["image_id"] == row.id and e["category_id"] in (1, 2, 3) for e in entries)
        results += entries
    gt = scoring.coco_ground_truth(truths, ["disk", "box", "triangle"])
    again = scoring.evaluate_json(gt, results, max_dets=20)
    scores = json.loads((project / "data" / "evaluate" / "scores.json").read_text())
    assert again["segm"]["map"] == pytest.approx(scores["segm"]["map"], abs=1e-9)


@pytest.mark.slow  # 40-90 s: the default run keeps the semantic family's resume test of the same machinery
def test_a_killed_instance_training_resumes_bit_identical(project):
    # The shared machinery under Mask R-CNN: SIGKILL once an epoch is checkpointed; the rerun resumes
    # from it and ends with the same weights, byte for byte, as an uninterrupted run (CPU).
    import hashlib
    import signal
    import time

    import torch

    set_params(project, {"train": {"epochs": 3}}, "the resume test")

    def train() -> subprocess.CompletedProcess:
        run = [sys.executable, "-m", "tasks.train"]
        return subprocess.run(run, cwd=project, env=stage_env(), capture_output=True, text=True, timeout=600)

    def weights() -> str:
        return hashlib.sha256((project / "data/train/model/model.safetensors").read_bytes()).hexdigest()

    done = train()
    assert done.returncode == 0, done.stderr[-2000:]
    uninterrupted = weights()
    stage = subprocess.Popen(
        [sys.executable, "-m", "tasks.train"],
        cwd=project,
        env=stage_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = sorted((project / ".segflow" / "checkpoints").glob("train-*/last.ckpt"))
        if found and torch.load(found[0], weights_only=False)["epoch"] >= 0 and stage.poll() is None:
            break
        time.sleep(0.05)
    else:
        stage.kill()
        pytest.fail("no checkpoint appeared")
    stage.send_signal(signal.SIGKILL)
    stage.wait()
    resumed = train()
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from epoch" in resumed.stderr
    assert weights() == uninterrupted


@pytest.mark.slow  # 30-60 s: two training processes; the semantic DDP test in the default run covers the launcher
def test_ddp_two_cpu_processes_train_one_mask_rcnn(project):
    # Two DDP processes on the CPU (gloo): the same final weights and BatchNorm statistics on both, one
    # model folder written (rank 0), and the validation AP scored over the whole val split.
    set_params(project, {"train": {"epochs": 2, "devices": 2, "strategy": "ddp", "accelerator": "cpu"}}, "ddp")
    try:
        run = [sys.executable, "-m", "tasks.train"]
        done = subprocess.run(run, cwd=project, env=stage_env(), capture_output=True, text=True, timeout=600)
    finally:
        set_params(project, {"train": {"epochs": 1, "devices": 1, "strategy": "auto"}}, "ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    import re

    digests = dict(re.findall(r"rank (\d) of 2: final weights sha256 (\w+)", done.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], done.stderr[-3000:]
    assert "2 processes (DDP)" in done.stderr
    written = sorted(p.name for p in (project / "data/train").iterdir() if p.name != ".gitignore")  # dvc's own
    assert written == ["live", "model"]
    card = json.loads((project / "data/train/model/model.json").read_text())
    assert card["training"]["epochs"] == 2 and card["task"] == "instance"
