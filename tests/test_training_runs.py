"""Training you can leave running: resume after a kill, NaN stop, early stopping, schedules, DDP.

The stage runs as users run it (``python -m tasks.train`` in a project folder) where a process
boundary matters: killing it, resuming it, and DDP's second process.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from bench._util import fresh_project, merge
from segflow import augment
from segflow.data import ingest
from segflow.errors import SegflowError
from segflow.layout import EVAL_PIPELINE, MODEL_DIR, load_transform, read_manifest, split_rows
from segflow.ops.env import stage_env
from segflow.params import TrainParams, load_params
from segflow.semantic import checkpoints, losses, metrics, store, train
from segflow.semantic import dataset as datasets
from segflow.semantic.module import NonFiniteLoss, build_schedule
from tests.conftest import TINY

KILLABLE = {"train": {"epochs": 6}}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project with ingest and augment done (in-process, fast); the train stage is run by each test."""
    project = fresh_project(tmp_path_factory.mktemp("training") / "project", merge(TINY, KILLABLE))
    params = load_params(project / "params.yaml")
    paths = params.paths.under(project)
    ingest.run(params, paths)
    augment.run(params, paths)
    (project / ".params.orig").write_text((project / "params.yaml").read_text())
    return project


def _set(project: Path, override: dict) -> None:
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), override), sort_keys=False))


def _reset(project: Path) -> None:
    """params.yaml as the fixture wrote it."""
    (project / "params.yaml").write_text((project / ".params.orig").read_text())


def _train(project: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tasks.train"],
        cwd=project,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _weights(project: Path) -> str:
    return hashlib.sha256((project / "data/train" / MODEL_DIR / "model.safetensors").read_bytes()).hexdigest()


def _checkpoint_folders(project: Path) -> list[Path]:
    return sorted((project / ".segflow" / "checkpoints").glob("train-*"))


def test_a_killed_run_resumes_and_ends_bit_identical_to_an_uninterrupted_one(project):
    done = _train(project)
    assert done.returncode == 0, done.stderr[-2000:]
    uninterrupted = _weights(project)
    assert not any(p.iterdir() for p in _checkpoint_folders(project)), "a finished run removes its checkpoints"
    assert "resuming" not in done.stderr

    # Kill the stage (SIGKILL: no clean-up of any kind) once two epochs are checkpointed, mid-way through the next.
    stage = subprocess.Popen(
        [sys.executable, "-m", "tasks.train"],
        cwd=project,
        env=stage_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        folders = _checkpoint_folders(project)
        last = folders[0] / checkpoints.LAST if folders else None
        if last and last.is_file() and torch.load(last, weights_only=False)["epoch"] >= 1:
            break
        time.sleep(0.05)
    else:
        stage.kill()
        pytest.fail("no checkpoint appeared")
    time.sleep(0.1)
    stage.kill()
    stage.wait()
    assert stage.returncode == -signal.SIGKILL

    assert len(folders) == 1
    resumed = _train(project)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    match = re.search(r"resuming from epoch (\d+) of 6", resumed.stderr)
    assert match and int(match.group(1)) >= 3, resumed.stderr[-2000:]
    assert _weights(project) == uninterrupted  # bit-identical: same bytes, same dvc.lock hash


def test_a_nan_loss_stops_the_run_with_one_line_naming_epoch_step_and_causes(
    tiny_params, tiny_paths, prepared, monkeypatch
):
    real = losses.build_loss

    class Poisoned(torch.nn.Module):
        """The real loss for four steps, then NaN (as a diverging run would give)."""

        def __init__(self, name):
            super().__init__()
            self.inner, self.calls = real(name), 0

        def forward(self, logits, targets):
            self.calls += 1
            loss = self.inner(logits, targets)
            return loss * math.nan if self.calls > 4 and torch.is_grad_enabled() else loss

    monkeypatch.setattr("segflow.semantic.module.build_loss", Poisoned)
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"epochs": 3})})
    with pytest.raises(NonFiniteLoss) as caught:
        train.run(params, tiny_paths)
    message = str(caught.value)
    per_epoch = len(split_rows(read_manifest(tiny_paths.ingest), "train")) // 4  # batch 4, last partial dropped
    epoch, step = divmod(4, per_epoch)  # the fifth step, counted from 0
    assert f"at epoch {epoch + 1}, step {step + 1} of {per_epoch}" in message
    assert "lower train.lr" in message and "grad_clip" in message and "\n" not in message
    assert not (tiny_paths.train / MODEL_DIR).exists()  # no useless model


class _Scripted(L.LightningModule):
    """A module whose validation metric follows a script, one value per epoch."""

    def __init__(self, script: list[float], name: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.script, self.name = script, name

    def training_step(self, batch, batch_idx):
        if self.name.startswith("train/"):
            self.log(self.name, self.script[self.current_epoch], on_step=False, on_epoch=True, batch_size=1)
        return (self.weight - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        if self.name.startswith("val/"):
            self.log(self.name, self.script[self.current_epoch], on_epoch=True, batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("monitor", "script", "patience", "stops_after"),
    [
        ("val/iou_macro", [0.1, 0.3, 0.35, 0.34, 0.35, 0.2, 0.9, 0.9], 3, 6),  # best at epoch 3; 3 without gain
        ("val/loss", [0.9, 0.5, 0.6, 0.7, 0.4, 0.3, 0.3, 0.3], 2, 4),  # a loss improves downwards
        ("val/iou_macro", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], 2, 8),  # always improving: all 8 epochs
        ("train/loss", [0.9, 0.8, 0.85, 0.9, 0.95, 0.5, 0.4, 0.3], 3, 5),  # logged after validation
    ],
)
def test_early_stopping_stops_at_the_expected_epoch(tmp_path, monitor, script, patience, stops_after):
    cfg = TrainParams(monitor=monitor, patience=patience)
    callbacks, checkpoint = train._callbacks(cfg, tmp_path, validated=True)
    data = [(torch.zeros(1, 1),)]
    trainer = L.Trainer(
        max_epochs=len(script),
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(_Scripted(script, monitor), train_dataloaders=data, val_dataloaders=data)
    assert trainer.current_epoch == stops_after
    best = max(script[:stops_after]) if cfg.resolved_mode() == "max" else min(script[:stops_after])
    assert float(checkpoint.best_model_score) == pytest.approx(best)


def test_patience_without_a_validation_split_is_a_clear_error(tmp_path):
    with pytest.raises(SegflowError, match="needs a validation split"):
        train._callbacks(TrainParams(patience=3), tmp_path, validated=False)


@pytest.mark.parametrize("name", ["onecycle", "cosine", "poly", "constant"])
def test_schedules_warm_up_and_end_where_they_should(name):
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    schedule = build_schedule(optimizer, name, 0.1, total=100, warmup=10)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert max(rates) == pytest.approx(0.1, rel=1e-3)
    assert rates[0] < 0.05  # every schedule starts low (onecycle: max_lr / 25)
    if name in ("cosine", "poly", "onecycle"):
        assert rates[-1] < 0.01 and rates.index(max(rates)) < 40
    if name == "constant":
        assert rates[10:] == [pytest.approx(0.1)] * 90


def test_ddp_two_cpu_processes_agree_and_log_the_whole_val_split(project):
    _set(project, {"train": {"devices": 2, "strategy": "ddp", "accelerator": "cpu", "epochs": 2}})
    try:
        done = _train(project)
    finally:
        _reset(project)
    assert done.returncode == 0, done.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d) of 2: final weights sha256 (\w+)", done.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], done.stderr[-3000:]
    assert "2 processes (DDP)" in done.stderr
    # One model folder, written once (rank 0), nothing half-written beside it.
    assert sorted(p.name for p in (project / "data/train").iterdir()) == ["live", "model"]
    assert sorted(p.name for p in (project / "data/train/model").iterdir()) == [
        "model.json",
        "model.safetensors",
        "preprocess.json",
    ]
    # The IoU logged for the kept epoch is the IoU of the saved model over the whole val split.
    params = load_params(project / "params.yaml")
    paths = params.paths.under(project)
    model, card = store.load(paths.train / MODEL_DIR)
    rows = split_rows(read_manifest(paths.ingest), "val")
    dataset = datasets.SegmentationDataset(paths.ingest, rows, load_transform(paths.augment / EVAL_PIPELINE))
    totals = None
    with torch.no_grad():
        # The batches the two processes validated (the same batches give the same arithmetic).
        shards = [datasets.same_shape_batches(rows, params.train.batch_size, rank, 2) for rank in (0, 1)]
        for batch in shards[0] + shards[1]:
            images = torch.stack([dataset[i][0] for i in batch])
            masks = torch.stack([dataset[i][1] for i in batch])
            counts = torch.stack([c.sum(0) for c in metrics.confusion_counts(model(images).argmax(1), masks, 4)])
            totals = counts if totals is None else totals + counts
    whole = metrics.summarize(*(t[None] for t in totals), params.classes)["iou"]["macro"]
    assert card.training["best_val_iou_macro"] == pytest.approx(whole, abs=1e-6)


def test_a_checkpoint_of_other_params_data_or_code_is_not_resumed(tmp_path):
    """The run key changes with anything that changes what is trained, and only with that."""
    params = load_params(Path(__file__).parents[1] / "params.yaml")
    data = tmp_path / "manifest.csv"
    data.write_text("id,split\na,train\n")
    code = tmp_path / "train.py"
    code.write_text("x = 1\n")

    def key(p=params) -> str:
        return checkpoints.run_key(p.train.model_dump(mode="json", exclude=set(checkpoints.SPEED_ONLY)), [data], [code])

    base = key()
    assert key() == base
    assert key(params.model_copy(update={"train": params.train.model_copy(update={"num_workers": 3})})) == base
    assert key(params.model_copy(update={"train": params.train.model_copy(update={"lr": 0.002})})) != base
    data.write_text("id,split\na,train\nb,train\n")
    assert key() != base
    data.write_text("id,split\na,train\n")
    code.write_text("x = 2\n")
    assert key() != base
    # Retention: the two newest other folders stay, older ones go; this run's own folder is created.
    root = tmp_path / "checkpoints"
    for age, name in enumerate(["train-old", "train-older", "train-oldest"]):
        (root / name).mkdir(parents=True)
        os.utime(root / name, (time.time() - 100 * (age + 1),) * 2)
    mine = checkpoints.folder(root, "new")
    assert sorted(p.name for p in root.iterdir()) == ["train-new", "train-old", "train-older"] and mine.is_dir()
    checkpoints.finished(mine)
    assert not mine.exists()
