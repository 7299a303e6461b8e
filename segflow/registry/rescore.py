"""Scores measured on one test split: the split's identity, and the champion re-scored on the candidate's split.

A scheduled retrain exists for new data, and new data changes the test split: the champion's stored score
was measured on *its* split, the candidate's on today's. The gate compares like with like by scoring the
champion (fetched by its tag, weights checked against its card) with the evaluate stage's own evaluator
on the candidate's split. Re-scores are cached by (version, split hash, predict settings), so an unchanged nightly run
re-scores nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from segflow.errors import SegflowError
from segflow.io import write_text
from segflow.layout import read_manifest, split_digest, split_rows
from segflow.params import Params
from segflow.registry.fetch import Version, fetch
from segflow.stage import STATE_DIR

log = logging.getLogger(__name__)

#: Where re-scores are kept: ``.segflow/rescore/<model>/<version>/<split sha256>-<predict settings>.json``.
CACHE_DIR = STATE_DIR / "rescore"


def test_split(root: Path, params: Params) -> dict:
    """The identity of the workspace's test split: sha256 over its ids and stored image and mask bytes.

    Returns:
        ``{"sha256": hex, "images": N, "ids": [...], "frozen": bool}``; frozen when data growth cannot move
        images into it: ``ingest.test_ids`` (``segflow freeze-test``), the dataset's own lists
        (``split_lists``, ``layout: split_folders``), or ``split_ids.test`` with ``test_fraction: 0``.
    """
    ingest = root / params.paths.ingest
    rows = split_rows(read_manifest(ingest), "test")
    cfg = params.ingest
    frozen = cfg.test_ids is not None or (
        cfg.source == "folder"
        and (
            cfg.split_lists is not None
            or cfg.layout == "split_folders"
            or (bool(cfg.split_ids and cfg.split_ids.get("test")) and cfg.test_fraction == 0)
        )
    )
    digest = split_digest(ingest, rows)
    return {"sha256": digest, "images": len(rows), "ids": list(rows["id"]), "frozen": bool(frozen)}


def describe_change(before: dict | None, now: dict) -> str | None:
    """How the test split moved since ``before`` (a card's ``test_split``), or None when it did not."""
    if before and before.get("sha256") == now["sha256"]:
        return None
    if not before or "ids" not in before:
        return "its test split is not recorded"
    old, new = set(before["ids"]), set(now["ids"])
    parts = []
    if new - old:
        parts.append(f"{len(new - old)} images added")
    if old - new:
        parts.append(f"{len(old - new)} removed")
    if not parts:
        parts.append("the same ids with other image or mask bytes")
    return ", ".join(parts)


def champion_split(root: Path, version: Version, model: str) -> dict | None:
    """The ``test_split`` its card recorded at the version's commit (None for cards older than this)."""
    from segflow.registry.git import git

    text = git(root, "show", f"{version.commit}:registry/{model}/card.json", check=False)
    try:
        return json.loads(text).get("test_split") if text else None
    except ValueError:
        return None


def rescore(root: Path, params: Params, version: Version, split: dict) -> tuple[dict, bool]:
    """The metrics of ``version`` on the workspace's test split (``split`` from :func:`test_split`).

    Returns:
        (metrics as evaluate writes them, whether they came from the cache).

    Raises:
        SegflowError: the version's model cannot be fetched, fails its checks, or has other classes.
    """
    from segflow.semantic.card import read_card
    from segflow.semantic.evaluate import score_model

    # Keyed by the split and by the inference settings the score depends on (tiling, batch).
    settings = hashlib.sha256(params.predict.model_dump_json().encode()).hexdigest()[:12]
    cached = root / CACHE_DIR / version.name / version.version / f"{split['sha256']}-{settings}.json"
    if cached.is_file():
        try:
            return json.loads(cached.read_text()), True
        except ValueError:
            cached.unlink()
    folder = fetch(root, version)
    from segflow.instance.card import is_instance_card

    instance = is_instance_card(folder)
    if instance != (params.task == "instance"):
        raise SegflowError(
            f"{version.label} is a {'n instance' if instance else ' semantic'} model and this project's task is "
            f"{params.task}: their scores cannot be compared on one split"
        )
    if instance:
        from segflow.instance.card import read_card as read_instance_card
        from segflow.instance.evaluate import score_model as score_instances

        card, score_model = read_instance_card(folder), score_instances
    else:
        card = read_card(folder)
    if card.classes != params.classes:
        raise SegflowError(
            f"{version.label} segments {card.classes}, this project {params.classes}: "
            "their scores cannot be compared on one split"
        )
    log.info("re-scoring %s on the current test split (%d images)", version.label, split["images"])
    metrics = score_model(folder, params, params.paths.under(root))
    write_text(cached, json.dumps(metrics, indent=2) + "\n")
    return metrics, False
