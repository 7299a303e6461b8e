"""Per-epoch training checkpoints that survive a kill, and the rule that keeps the disk from filling.

They live in ``.segflow/checkpoints/train-<key>/`` in the project, outside DVC's outputs (which DVC
deletes before it runs a stage). ``<key>`` is a digest of everything that determines the run: the
train stage's params, the bytes of its input data (manifest with every image's sha256, the saved
pipelines) and of segflow's code (``tasks/*.py``). A run resumes only a checkpoint with its own key,
so a checkpoint from other params, data or code is never picked up.

Retention: a run that finishes deletes its own checkpoints (its model is in DVC's cache by then). A
run that is killed leaves them for the next run to resume. At each start, checkpoints of other keys
are deleted except the two most recently written (so switching params back and forth after a kill
does not lose them at once, and many scheduled runs never pile up more than three folders).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

LAST = "last.ckpt"
#: Params that change how fast a run goes or what it says, not what it computes: not part of the key.
#: (train.max_minutes and train.val_every are: they decide where training stops and which epoch is kept.)
SPEED_ONLY = ("num_workers", "cache_mb", "resume", "log_every_s")
KEEP_OTHERS = 2


def run_key(params: dict, inputs: list[Path], code: list[Path]) -> str:
    """A digest of the params (JSON-sorted), the input files' bytes and the code files' bytes."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for path in [*inputs, *sorted(code)]:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:20]


def folder(root: Path, key: str) -> Path:
    """This run's checkpoint folder (created); other keys' folders pruned by the retention rule."""
    root.mkdir(parents=True, exist_ok=True)
    mine = root / f"train-{key}"
    others = sorted(
        (p for p in root.glob("train-*") if p.is_dir() and p != mine), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for stale in others[KEEP_OTHERS:]:
        shutil.rmtree(stale, ignore_errors=True)
        log.info("removed checkpoints of an older run with other params, data or code: %s", stale)
    mine.mkdir(exist_ok=True)
    return mine


def resumable(path: Path) -> tuple[Path, int] | None:
    """The last checkpoint in ``path`` and the epochs it completed, if it can be read.

    A file that cannot be read (the disk filled up, say) is deleted with a log line: the run starts over.
    """
    import torch

    last = path / LAST
    if not last.is_file():
        return None
    try:
        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)  # reads the epoch, not the tensors
        return last, int(state["epoch"]) + 1
    except Exception as error:
        log.warning("checkpoint %s cannot be read (%s); training starts from epoch 1", last, error)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)
        return None


def finished(path: Path) -> None:
    """The run finished and its model is saved: its checkpoints have no further use."""
    shutil.rmtree(path, ignore_errors=True)
