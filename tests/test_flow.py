"""The flow's helpers: stopping a stage, reporting its failure, the headline."""

from __future__ import annotations

import os
import subprocess
import time
from collections import deque

from segflow.ops.runner import failure_reason as _failure_reason
from segflow.ops.runner import stop as _stop
from segflow.ops.summary import headline


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


def test_stop_ends_the_stage_and_what_it_started(tmp_path):
    # Like DVC: a shell running the stage's command, which ignores SIGTERM on the shell.
    pidfile = tmp_path / "child.pid"
    proc = subprocess.Popen(
        ["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"],
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pidfile.read_text())
    _stop(proc)
    assert proc.poll() is not None
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the stage's own process outlived the cancel"


def test_failure_reason_prefers_the_stages_own_error():
    lines = deque(["Running stage 'train':", "segflow train: error: train.encoder: unknown encoder", "ERROR: failed"])
    assert _failure_reason("train", lines, 2) == "stage 'train' failed: train.encoder: unknown encoder"
    assert _failure_reason("x", deque(["boom"]), 1) == "stage 'x' failed with exit code 1: boom"


def test_headline_counts_only_scored_classes():
    metrics = {
        "images": 3,
        "iou": {"macro": 0.5, "per_class": {"bg": 0.9, "a": 0.1, "b": None}},
        "dice": {"macro": 0.6, "per_class": {"bg": 0.95, "a": 0.2, "b": None}},
    }
    line = headline(metrics)
    assert "macro over 2 classes" in line and "b " not in line and "on 3 images" in line


def test_the_run_summary_compares_only_like_with_like():
    from segflow.ops.summary import metric_change

    def scores(value, classes=("bg", "a"), split="s1", images=10):
        return {"images": images, "split_sha256": split, "iou": {"macro": value, "per_class": dict.fromkeys(classes)}}

    assert metric_change(scores(0.5), scores(0.6)) == "test IoU macro 0.6000 (+0.1000 against 0.5000 before this run)"
    other_classes = metric_change(scores(0.8765, ("bg", "a", "b", "c")), scores(0.1735, [f"c{i}" for i in range(12)]))
    assert "not compared: the classes changed" in other_classes and "-0.70" not in other_classes
    headline_only = {"images": 10, "iou": {"macro": 0.5}}  # a metrics.json, when scores.json is not there
    assert metric_change(headline_only, scores(0.6)) == "test IoU macro 0.6000 (+0.1000 against 0.5000 before this run)"
    grown = metric_change(scores(0.5), scores(0.6, split="s2", images=14))
    assert "not compared: the test split changed since the last run, 10 -> 14 images" in grown


def test_stale_dvc_lock_entries_of_killed_stages_are_cleared_once_quietly(tmp_path):
    import json
    import os
    import subprocess

    from segflow.ops.lock import clear_stale_dvc_locks

    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / ".dvc" / "tmp" / "rwlock"
    lock.parent.mkdir(parents=True)
    killed = {"pid": dead.pid, "cmd": "dvc repro --single-item train"}
    alive = {"pid": os.getpid(), "cmd": "dvc status"}
    lock.write_text(json.dumps({"read": {"data/ingest": [killed, alive]}, "write": {"data/train/model": killed}}))
    assert clear_stale_dvc_locks(tmp_path) == 2
    assert json.loads(lock.read_text()) == {"read": {"data/ingest": [alive]}, "write": {}}
    assert clear_stale_dvc_locks(tmp_path) == 0
