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
from segflow.semantic import dataset as datasets
from segflow.semantic import losses, metrics, store, train
from segflow.semantic.card import read_card
from segflow.semantic.module import SegmentationModule
from segflow.training import callbacks, checkpoints
from segflow.training import stage as training_stage
from segflow.training.module import NonFiniteLoss, build_schedule
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

        def __init__(self, name, class_weights=None):
            super().__init__()
            self.inner, self.calls = real(name, class_weights), 0

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
        self.validated: list[int] = []  # the epochs (from 1) that ran a validation

    def training_step(self, batch, batch_idx):
        if self.name.startswith("train/"):
            self.log(self.name, self.script[self.current_epoch], on_step=False, on_epoch=True, batch_size=1)
        return (self.weight - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.validated.append(self.current_epoch + 1)
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
    callbacks, checkpoint = training_stage.build_callbacks(cfg, tmp_path, validated=True)
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
        training_stage.build_callbacks(TrainParams(patience=3), tmp_path, validated=False)


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

    def changed(**update) -> str:
        return key(params.model_copy(update={"train": params.train.model_copy(update=update)}))

    base = key()
    assert key() == base
    assert changed(num_workers=3) == base
    assert changed(log_every_s=5) == base  # what the run says, not what it computes
    assert changed(lr=0.002) != base
    # Where training stops and which epoch is kept: a checkpoint of another budget is not resumed.
    assert changed(max_minutes=30) != base and changed(val_every=2) != base
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


# --- progress within an epoch, val_every, max_minutes: on a scripted clock ------------------------


class _Killed(Exception):
    """Stands for the kill of a stage process (its checkpoints stay, nothing else happens)."""


@pytest.fixture
def slow(monkeypatch):
    """The callbacks' clock on a script: each training step takes ``step_s`` and each validation batch
    ``val_s`` more than it really does; the training step at global step ``kill_at`` raises :class:`_Killed`."""
    plan = {"step_s": 0.0, "val_s": 0.0, "kill_at": None, "offset": 0.0}
    monkeypatch.setattr(callbacks, "clock", lambda: time.perf_counter() + plan["offset"])
    real_train, real_val = SegmentationModule.training_step, SegmentationModule.validation_step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == plan["kill_at"]:
            raise _Killed
        plan["offset"] += plan["step_s"]
        return real_train(self, batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        plan["offset"] += plan["val_s"]
        return real_val(self, batch, batch_idx)

    monkeypatch.setattr(SegmentationModule, "training_step", training_step)
    monkeypatch.setattr(SegmentationModule, "validation_step", validation_step)
    return plan


def _with(params, **train_update):
    return params.model_copy(update={"train": params.train.model_copy(update=train_update)})


def _steps(paths, batch_size: int) -> int:
    """Training steps per epoch (the last partial batch dropped)."""
    return len(split_rows(read_manifest(paths.ingest), "train")) // batch_size


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("segflow")]


def _seconds(text: str) -> int:
    """``1h02m`` / ``3m10s`` / ``42s`` back to seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text).groups()
    hours, minutes, seconds = (int(p or 0) for p in parts)
    return hours * 3600 + minutes * 60 + seconds


def _about(eta: str, scripted: float) -> bool:
    """An ETA worked out from the scripted seconds, plus the real ones the steps took (well under a tenth)."""
    return scripted - 1 <= _seconds(eta) <= scripted * 1.3 + 3


def test_progress_lines_come_within_a_slow_epoch_and_move_the_flows_progress(prepared, slow, caplog, monkeypatch):
    params, paths = prepared
    slow.update(step_s=20.0, val_s=40.0)  # log_every_s 30: a line every second step, every validation batch
    with caplog.at_level("INFO", logger="segflow"):
        train.run(_with(params, epochs=2, batch_size=4, log_every_s=30), paths)
    lines = _messages(caplog)
    steps = _steps(paths, 4)
    assert steps >= 4
    step_line = r"epoch (\d)/2, step (\d+)/(\d+): ([\d.]+) img/s, loss ([\d.]+), epoch ETA (\S+), run ETA (\S+)$"
    rows = [m.groups() for m in map(re.compile(step_line).match, lines) if m]
    # The first step's start-up line counts as a line; then one each 30 s: 2 steps of 20 s.
    assert [int(r[1]) for r in rows if r[0] == "1"] == list(range(3, steps + 1, 2))
    assert [int(r[1]) for r in rows if r[0] == "2"] == list(range(2, steps + 1, 2))
    assert all(int(r[2]) == steps and float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    validation_line = re.compile(r"epoch (\d)/2, validation (\d+)/(\d+): [\d.]+ img/s, ETA (\S+)$")
    validations = [m.groups() for m in map(validation_line.match, lines) if m]
    batches = int(validations[0][2])
    assert [int(v[1]) for v in validations if v[0] == "1"] == list(range(1, batches + 1))  # 40 s a batch
    assert _about(validations[0][3], 40 * (batches - 1))
    # ETAs: this epoch's seconds per step for the steps left; the epoch-1 validation's time once measured.
    first, second = rows[0], next(r for r in rows if r[0] == "2")
    assert _about(first[5], 20 * (steps - 3)), first
    assert _about(first[6], 20 * (steps - 3) + 20 * steps), first  # validation not timed yet
    assert first[6] != second[6] and second[5] == second[6], second  # the last epoch: the run's ETA is the epoch's
    assert _about(second[5], 20 * (steps - 2) + 40 * batches), second
    # The per-epoch lines are as they were.
    epoch_lines = [line for line in lines if re.match(r"epoch \d/2: train loss [\d.]+, val loss [\d.]+, val IoU", line)]
    assert len(epoch_lines) == 2

    # The flow's progress artifact follows them (percent of the run), at most one write per PROGRESS_EVERY_S.
    from segflow.ops import runner

    writes = []
    monkeypatch.setattr(runner, "create_progress_artifact", lambda percent, **_: writes.append(percent) or "id")
    monkeypatch.setattr(runner, "update_progress_artifact", lambda artifact, percent, **_: writes.append(percent))
    now = [0.0]
    progress = runner._Progress("train", clock=lambda: now[0])
    for line in lines:
        now[0] += runner.PROGRESS_EVERY_S
        progress.see(f"[train] INFO {line}")
    # One write per line that moves it: steps done, and each epoch's end (its validation and epoch lines
    # name the same point, so only the first of them writes).
    moved = {100 * (int(e) - 1 + int(done) / int(total)) / 2 for e, done, total, *_ in rows}
    moved |= {100 * int(e) / 2 for e, *_ in validations}
    assert writes == pytest.approx(sorted(moved)) and writes[-1] == 100.0
    assert writes[0] == pytest.approx(100 * 3 / steps / 2)
    writes.clear()
    burst = runner._Progress("train", clock=lambda: 0.0)  # lines faster than PROGRESS_EVERY_S: the first, the 100%
    for line in lines:
        burst.see(f"[train] INFO {line}")
    assert writes == [pytest.approx(100 * 3 / steps / 2), 100.0]


@pytest.mark.parametrize(
    ("script", "patience", "validated", "best"),
    [
        # val_every 2 over 5 epochs: epochs 2, 4 and the last; epoch 3's 0.9 is never validated, so never kept.
        ([0.1, 0.4, 0.9, 0.3, 0.2], 0, [2, 4, 5], 0.4),
        # patience counts validations: 2 without a gain after epoch 2's (at 4 and 6) stop the run at 6.
        ([0.1, 0.5, 0.2, 0.4, 0.9, 0.3, 0.35, 0.2], 2, [2, 4, 6], 0.5),
    ],
)
def test_val_every_validates_every_nth_and_the_last_epoch_and_keeps_a_validated_one(
    tmp_path, script, patience, validated, best
):
    cfg = TrainParams(val_every=2, patience=patience)
    callbacks_, checkpoint = training_stage.build_callbacks(cfg, tmp_path, validated=True)
    module = _Scripted(script, "val/iou_macro")
    data = [(torch.zeros(1, 1),)]
    trainer = L.Trainer(
        max_epochs=len(script),
        check_val_every_n_epoch=cfg.val_every,
        callbacks=callbacks_,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
    assert module.validated == validated and trainer.current_epoch == validated[-1]
    assert float(checkpoint.best_model_score) == pytest.approx(best)
    kept = torch.load(checkpoint.best_model_path, weights_only=True)
    assert int(kept["epoch"]) + 1 == validated[[script[e - 1] for e in validated].index(best)]
    # Every epoch leaves a checkpoint to resume from, validated or not.
    assert torch.load(tmp_path / checkpoints.LAST, weights_only=True)["epoch"] == validated[-1] - 1


def test_val_every_and_median_frequency_weights_in_a_stage_run(prepared, caplog):
    params, paths = prepared
    with caplog.at_level("INFO", logger="segflow"):
        summary = train.run(_with(params, epochs=3, batch_size=8, val_every=2, class_weights="median_frequency"), paths)
    epoch_lines = [line for line in _messages(caplog) if re.match(r"epoch \d/3: ", line)]
    assert ["val IoU" in line for line in epoch_lines] == [False, True, True]  # epoch 2, and the last
    assert summary["best_epoch"] in (2, 3) and summary["val_every"] == 2
    live = paths.train / "live" / "plots" / "metrics" / "val" / "iou_macro.tsv"
    assert len(live.read_text().splitlines()) == 1 + 2
    rows = split_rows(read_manifest(paths.ingest), "train")
    expected = losses.median_frequency(rows[[f"px_{c}" for c in params.classes]].to_numpy(), params.classes)
    card = read_card(paths.train / MODEL_DIR)
    assert card.training["class_weights"]["method"] == "median_frequency"
    assert list(card.training["class_weights"]["weights"].values()) == pytest.approx(expected, abs=1e-6)
    assert "class weights (median frequency of the train split) for the loss's cross-entropy term" in caplog.text


def test_max_minutes_stops_after_the_step_that_used_it_and_validates_those_weights(prepared, slow, caplog):
    params, paths = prepared
    slow.update(step_s=60.0)
    steps = _steps(paths, 4)
    assert steps >= 3
    with caplog.at_level("INFO", logger="segflow"):
        summary = train.run(_with(params, epochs=4, batch_size=4, val_every=2, max_minutes=2), paths)
    # Two steps of a minute: stopped in epoch 1, which val_every 2 would not have validated.
    assert summary["stopped_by"] == "max_minutes" and summary["epochs"] == 1
    assert summary["stopped_at"] == {"epoch": 1, "step": 2, "steps": steps}
    assert summary["train_minutes"] == pytest.approx(2, abs=0.05) and summary["max_minutes"] == 2
    assert summary["best_epoch"] == 1  # the stop's validation, the only one
    lines = _messages(caplog)
    (stop,) = [line for line in lines if line.startswith("stopped by train.max_minutes")]
    expected = rf"stopped by train.max_minutes \(2\): 2m0\ds of training used, at epoch 1/4, step 2/{steps}; validating"
    assert re.match(expected, stop), stop
    (epoch_line,) = [line for line in lines if re.match(r"epoch \d/4: ", line)]
    assert "val IoU" in epoch_line and re.search(rf", stopped after step 2 of {steps}, [\d.]+ s$", epoch_line)
    card = read_card(paths.train / MODEL_DIR)
    assert card.training["stopped_by"] == "max_minutes" and card.training["stopped_at"]["step"] == 2


def test_max_minutes_counts_the_training_time_of_a_killed_run_after_resuming(prepared, slow, tmp_path, caplog):
    params, paths = prepared
    steps = _steps(paths, 8)
    params = _with(params, epochs=4, batch_size=8, val_every=2, max_minutes=steps + 1)
    root = tmp_path / "checkpoints"
    slow.update(step_s=60.0, kill_at=steps)  # killed at epoch 2's first step: epoch 1 (not validated) is saved
    with pytest.raises(_Killed):
        train.run(params, paths, checkpoint_root=root)
    (folder,) = root.glob("train-*")
    saved = torch.load(folder / checkpoints.LAST, weights_only=True)
    assert saved["epoch"] == 0 and saved["callbacks"]["Budget"]["train_seconds"] == pytest.approx(60 * steps, abs=5)
    slow["kill_at"] = None
    with caplog.at_level("INFO", logger="segflow"):
        summary = train.run(params, paths, checkpoint_root=root)
    assert "resuming from epoch 2 of 4" in caplog.text
    # `steps` minutes before the kill, one more after it.
    assert summary["stopped_at"] == {"epoch": 2, "step": 1, "steps": steps}
    assert summary["train_minutes"] == pytest.approx(steps + 1, abs=0.1)
    assert not folder.exists(), "a finished run removes its checkpoints"


@pytest.mark.slow  # 40-80 s: two training processes, one per "node"
def test_two_nodes_on_one_box_train_one_model(project, tmp_path):
    # The README's two-node command, as two node processes on 127.0.0.1 (gloo): NODE_RANK 0 in the project,
    # NODE_RANK 1 in a copy of it (another machine's clone). Same final weights on both, one model written.
    import shutil

    from segflow.ops.server import free_port

    two_nodes = {"train": {"devices": 1, "num_nodes": 2, "strategy": "ddp", "accelerator": "cpu", "epochs": 2}}
    _set(project, two_nodes)
    other = tmp_path / "node1"
    try:
        shutil.copytree(project, other, symlinks=True)
        before = {p: p.read_bytes() for p in (other / "data/train").rglob("*") if p.is_file()}
        port = str(free_port())
        nodes = [
            subprocess.Popen(
                [sys.executable, "-m", "tasks.train"],
                cwd=folder,
                env=stage_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank), WORLD_SIZE="2"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank, folder in enumerate((project, other))
        ]
        outputs = [node.communicate(timeout=600) for node in nodes]
    finally:
        _reset(project)
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    digests = {}
    for _, err in outputs:
        digests.update(re.findall(r"rank (\d) of 2: final weights sha256 (\w+)", err))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], digests
    after = {p: p.read_bytes() for p in (other / "data/train").rglob("*") if p.is_file()}
    assert after == before, "node 1 wrote nothing to its project"
    assert (project / "data/train" / MODEL_DIR / "model.safetensors").is_file()
    assert read_card(project / "data/train" / MODEL_DIR).training["epochs"] == 2
