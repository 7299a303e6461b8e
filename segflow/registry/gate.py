"""The champion/challenger gate: the champion's metric, the next version number, the decision.

The champion is the version that holds ``register.stage``; its metric is read from that version's own
commit. :func:`decide` compares by ``register.metric``, ``direction`` and ``min_improvement``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from segflow.errors import SegflowError
from segflow.layout import METRICS, SCORES
from segflow.params import Params
from segflow.registry.fetch import Version, versions
from segflow.registry.git import git


def metric_of(metrics: dict, dotted: str) -> float:
    """``iou.macro`` of a metrics.json document.

    Raises:
        SegflowError: no such metric.
    """
    value = metrics
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise SegflowError(f"register.metric: {dotted} is not in scores.json; e.g. iou.macro, dice.macro")
        value = value[part]
    if not isinstance(value, int | float):
        raise SegflowError(f"register.metric: {dotted} is not a number in scores.json")
    return float(value)


def champion_of(root: Path, params: Params) -> tuple[Version | None, float | None]:
    """The version holding ``register.stage`` and its metric on its own test split (from its own commit)."""
    cfg = params.register
    holder = next((v for v in versions(root, cfg.model) if cfg.stage in v.stages), None)
    if holder is None:
        return None, None
    import dvc.api
    from dvc.exceptions import DvcException

    # scores.json (DVC-cached) holds every metric; metrics.json (in git) the headline ones, and every metric
    # in commits from before scores.json; the tag message the registered metric's value.
    with contextlib.suppress(DvcException, OSError, ValueError, SegflowError):
        text = dvc.api.read((params.paths.evaluate / SCORES).as_posix(), repo=str(root), rev=holder.commit)
        return holder, metric_of(json.loads(text), cfg.metric)
    text = git(root, "show", f"{holder.commit}:{(params.paths.evaluate / METRICS).as_posix()}", check=False)
    with contextlib.suppress(ValueError, SegflowError):
        if text:
            return holder, metric_of(json.loads(text), cfg.metric)
    return holder, holder.info.get("metric_value")


def fair_champion(root: Path, params: Params, split: dict) -> dict:
    """The champion's score on the candidate's test split, and how it was obtained.

    When the split changed since the champion was registered (and ``register.rescore``), the champion is
    re-scored on the current split with the evaluate stage's evaluator; otherwise its stored score stands.

    Returns:
        ``{"version", "score", "own_score", "rescored", "cached", "change", "note"}`` (``version`` None when
        nothing holds the stage).
    """
    from segflow.registry.rescore import champion_split, describe_change, rescore

    cfg = params.register
    holder, own = champion_of(root, params)
    result = {"version": None, "score": None, "own_score": None, "rescored": False, "cached": False}
    result |= {"change": None, "note": None}
    if holder is None:
        return result
    result |= {"version": holder.version, "score": own, "own_score": own}
    change = describe_change(champion_split(root, holder, cfg.model), split)
    if change is None:
        return result
    result["change"] = change
    if not cfg.rescore:
        result["note"] = (
            f"test split changed since {holder.version}: {change}; the champion's {own:.4f} is from its own split "
            "(register.rescore: false)"
        )
        return result
    metrics, cached = rescore(root, params, holder, split)
    score = metric_of(metrics, cfg.metric)
    result |= {"score": score, "rescored": True, "cached": cached}
    own_text = f" ({own:.4f} on its own)" if own is not None else ""
    result["note"] = (
        f"test split changed since {holder.version}: {change}; champion re-scored {score:.4f} on it{own_text}"
    )
    return result


def next_version(latest: str | None, part: str) -> str:
    if latest is None:
        return "v0.1.0"
    major, minor, patch = (int(x) for x in latest.lstrip("v").split("."))
    return {
        "major": f"v{major + 1}.0.0",
        "minor": f"v{major}.{minor + 1}.0",
        "patch": f"v{major}.{minor}.{patch + 1}",
    }[part]


def decide(candidate: float, champion: float | None, direction: str, margin: float) -> tuple[bool, str]:
    """The gate: promote when nothing holds the stage, or the candidate beats the champion by ``margin``."""
    if champion is None:
        return True, "nothing holds the stage yet"
    gain = candidate - champion if direction == "max" else champion - candidate
    if gain >= margin - 1e-12:
        return True, f"better by {gain:.4f} (at least {margin} needed)"
    return False, f"not better by at least {margin} ({'+' if gain >= 0 else ''}{gain:.4f})"
