"""Registering a trained model: a GTO version, a model card, and the champion/challenger gate.

Git-side work after the DVC stages (it creates commits and tags), so it lives
with the orchestration, not in a stage. :func:`register`:

1. refuses while the pipeline is stale (``dvc status``) or pipeline files have
   uncommitted changes, unless ``register.commit`` lets it commit dvc.lock,
   params.yaml and the git-tracked metrics itself;
2. skips when the latest version already is this model (a no-op scheduled run);
3. reads the champion (the version in ``register.stage``) metric from that
   version's own commit and compares the candidate's, by ``register.metric``,
   ``direction`` and ``min_improvement``;
4. pushes to the DVC remote when there is one, commits the model card
   (``registry/<model>/card.md`` and ``card.json``), tags the next version with
   a JSON message (metrics, data and model hashes, params digest, commit), and
   assigns the stage when the candidate wins (or nothing holds it yet).
"""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path

from flows import _card
from flows._plan import dvc, has_remote
from flows._summary import provenance
from flows.models import versions
from tasks._common import SegflowError
from tasks._files import METRICS
from tasks._guard import stage_outputs
from tasks.params import Params, load_params

REGISTRY_DIR = Path("registry")


def _git(root: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SegflowError(f"git {' '.join(args)} failed in {root}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def metric_of(metrics: dict, dotted: str) -> float:
    """``iou.macro`` of a metrics.json document.

    Raises:
        SegflowError: no such metric.
    """
    value = metrics
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise SegflowError(f"register.metric: {dotted} is not in metrics.json; e.g. iou.macro, dice.macro")
        value = value[part]
    if not isinstance(value, int | float):
        raise SegflowError(f"register.metric: {dotted} is not a number in metrics.json")
    return float(value)


def _pipeline_files(root: Path, params: Params) -> set[str]:
    """What a registration may commit: the lock, params, DVC's .gitignore files and .dvc files,
    the git-tracked (``cache: false``) outputs, and the model cards."""
    from flows._plan import stage_order

    files = {"dvc.lock", "params.yaml"}
    for stage in stage_order(root):
        for path, cached in stage_outputs(stage, root):
            if not cached:
                files.add(str(path))
            files.add(str(Path(path).parent / ".gitignore"))
    return files


def _changes(root: Path, allowed: set[str]) -> list[str]:
    """Tracked files with uncommitted changes, and new files among ``allowed`` (a first run's metrics)."""
    tracked = [line[3:].strip('"') for line in _git(root, "status", "--porcelain", "--untracked-files=no").splitlines()]
    new = _git(root, "ls-files", "--others", "--exclude-standard").splitlines()
    return tracked + [path for path in new if path in allowed or path.startswith(tuple(f"{a}/" for a in allowed))]


def _check_ready(root: Path, params: Params, commit: bool) -> list[str]:
    """Refuse a stale pipeline or uncommitted pipeline files; return the files to commit.

    Raises:
        SegflowError: the message says what to run.
    """
    from dvc.repo import Repo

    if _git(root, "rev-parse", "--show-toplevel", check=False).strip() != str(root):
        raise SegflowError(f"{root}: not the top of a git repository; registration records versions as git tags")
    with Repo(str(root)) as repo:
        stale = repo.status()
    if stale:
        raise SegflowError(
            f"the pipeline is not up to date (dvc status: {', '.join(sorted(stale))} changed); "
            "run segflow run (or dvc repro), then register"
        )
    allowed = _pipeline_files(root, params)
    changed = _changes(root, allowed)
    pipeline = [p for p in changed if p in allowed or p.startswith(tuple(f"{a}/" for a in allowed))]
    pipeline.sort(key=lambda p: (p not in ("dvc.lock", "params.yaml"), p))  # the telling ones first
    others = [p for p in changed if p not in pipeline and not p.startswith(f"{REGISTRY_DIR}/")]
    if others and (commit or pipeline):
        raise SegflowError(
            f"uncommitted changes to {', '.join(others[:4])}{' ...' if len(others) > 4 else ''}: commit them "
            "(the registered version must say which code made it), then register"
        )
    if pipeline and not commit:
        raise SegflowError(
            f"uncommitted pipeline results ({', '.join(pipeline[:4])}{' ...' if len(pipeline) > 4 else ''}): "
            "git add and commit them, or set register.commit: true (segflow register --commit)"
        )
    return pipeline


def _champion(root: Path, params: Params) -> tuple[str | None, float | None]:
    """The version holding ``register.stage`` and its metric, read from that version's own commit."""
    cfg = params.register
    holder = next((v for v in versions(root, cfg.model) if cfg.stage in v.stages), None)
    if holder is None:
        return None, None
    path = (params.paths.evaluate / METRICS).as_posix()
    text = _git(root, "show", f"{holder.commit}:{path}", check=False)
    if not text:
        return holder.version, holder.info.get("metric_value")
    return holder.version, metric_of(json.loads(text), cfg.metric)


def _bump(latest: str | None, part: str) -> str:
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


def register(root: Path | str = ".", commit: bool | None = None) -> dict:
    """Register the workspace's model as the next version; promote it through the gate.

    Args:
        commit: commit the pipeline's results first (default: ``register.commit``).

    Returns:
        The outcome: model, version, registered, promoted, stage, metric, candidate, champion,
        champion_version, reason, commit, tag.

    Raises:
        SegflowError: a stale pipeline, uncommitted files, no model or metrics, or a git/GTO failure.
    """
    from gto import api

    root = Path(root).resolve()
    params = load_params(root / "params.yaml")
    cfg = params.register
    commit = cfg.commit if commit is None else commit
    to_commit = _check_ready(root, params, commit)
    metrics_path = root / params.paths.evaluate / METRICS
    if not metrics_path.is_file():
        raise SegflowError(f"{metrics_path}: not found; run the pipeline (segflow run) before registering")
    metrics = json.loads(metrics_path.read_text())
    candidate = metric_of(metrics, cfg.metric)
    origin = provenance(root)
    known = versions(root, cfg.model)
    outcome = {"model": cfg.model, "metric": cfg.metric, "direction": cfg.direction, "candidate": candidate}
    if known and known[0].info.get("model_md5") == origin["model_md5"]:
        return outcome | {
            "registered": False,
            "promoted": False,
            "version": known[0].version,
            "reason": f"{known[0].label} already is this model (nothing was retrained)",
        }
    champion_version, champion = _champion(root, params)
    promoted, reason = decide(candidate, champion, cfg.direction, cfg.min_improvement)
    version = _bump(known[0].version if known else None, cfg.bump)
    if has_remote(root):
        code, output = dvc(root, "push")
        if code != 0:
            raise SegflowError(f"dvc push failed before registering: {output.splitlines()[-1] if output else code}")
    source = origin["commit"]
    info = {
        "version": version,
        "metric": cfg.metric,
        "metric_value": candidate,
        "iou_macro": metrics["iou"]["macro"],
        "dice_macro": metrics["dice"]["macro"],
        "model_md5": origin["model_md5"],
        "data_md5": origin["data_md5"],
        "params_sha256": origin["params_sha256"],
        "source_commit": source,
        "registered_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "promoted_to": cfg.stage if promoted else None,
    }
    card = _card.build(root, params, metrics, info)
    folder = root / REGISTRY_DIR / cfg.model
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    (folder / "card.md").write_text(_card.markdown(card), encoding="utf-8")
    paths = [*to_commit, str(folder.relative_to(root))]
    _git(root, "add", "--", *paths)
    verdict = f"promoted to {cfg.stage}" if promoted else f"not promoted: {reason}"
    # Only these paths: whatever else the user has staged stays staged, out of this commit.
    message = f"Register {cfg.model} {version}: test {cfg.metric} {candidate:.4f} ({verdict})"
    _git(root, "commit", "-q", "-m", message, "--only", "--", *paths)
    head = _git(root, "rev-parse", "HEAD").strip()
    api.register(str(root), cfg.model, "HEAD", version=version, message=json.dumps(info, sort_keys=True))
    if promoted:
        api.assign(str(root), cfg.model, cfg.stage, version=version, message=json.dumps({"reason": reason}))
    return outcome | {
        "registered": True,
        "promoted": promoted,
        "version": version,
        "stage": cfg.stage,
        "champion": champion,
        "champion_version": champion_version,
        "reason": reason,
        "commit": head,
        "tag": f"{cfg.model}@{version}",
        "card": str((folder / "card.md").relative_to(root)),
    }


def summary_line(outcome: dict) -> str:
    """The outcome in one line, for the terminal and the dashboard."""
    metric = f"{outcome['metric']} {outcome['candidate']:.4f}"
    if not outcome["registered"]:
        return f"{outcome['model']}: nothing registered, {outcome['reason']}"
    champion = (
        f"against {outcome['champion_version']} {outcome['champion']:.4f}" if outcome["champion"] is not None else ""
    )
    if outcome["promoted"]:
        return (
            f"{outcome['tag']} registered and promoted to {outcome['stage']}: {metric} {champion} ({outcome['reason']})"
        )
    return f"{outcome['tag']} registered, not promoted: {metric} {champion}; {outcome['reason']}"
