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
   assigns the stage when the candidate wins (or nothing holds it yet)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from segflow.errors import SegflowError
from segflow.layout import METRICS
from segflow.ops.plan import dvc, has_remote
from segflow.params import Params, load_params
from segflow.registry import card
from segflow.registry.fetch import versions
from segflow.registry.gate import decide, fair_champion, metric_of, next_version
from segflow.registry.git import git
from segflow.registry.provenance import provenance
from segflow.stage import stage_outputs

REGISTRY_DIR = Path("registry")


def _pipeline_files(root: Path, params: Params) -> set[str]:
    """What a registration may commit: the lock, params, DVC's .gitignore files and .dvc files,
    the git-tracked (``cache: false``) outputs, and the model cards."""
    from segflow.ops.plan import stage_order

    files = {"dvc.lock", "params.yaml"}
    for stage in stage_order(root):
        for path, cached in stage_outputs(stage, root):
            if not cached:
                files.add(str(path))
            files.add(str(Path(path).parent / ".gitignore"))
    return files


def _changes(root: Path, allowed: set[str]) -> list[str]:
    """Tracked files with uncommitted changes, and new files among ``allowed`` (a first run's metrics)."""
    tracked = [line[3:].strip('"') for line in git(root, "status", "--porcelain", "--untracked-files=no").splitlines()]
    new = git(root, "ls-files", "--others", "--exclude-standard").splitlines()
    return tracked + [path for path in new if path in allowed or path.startswith(tuple(f"{a}/" for a in allowed))]


def _check_ready(root: Path, params: Params, commit: bool) -> list[str]:
    """Refuse a stale pipeline or uncommitted pipeline files; return the files to commit.

    Raises:
        SegflowError: the message says what to run.
    """
    from dvc.repo import Repo

    if git(root, "rev-parse", "--show-toplevel", check=False).strip() != str(root):
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
    from segflow.registry.rescore import test_split

    split = test_split(root, params)
    fair = fair_champion(root, params, split)
    champion_version, champion = fair["version"], fair["score"]
    promoted, reason = decide(candidate, champion, cfg.direction, cfg.min_improvement)
    if fair["note"]:
        reason = f"{reason}; {fair['note']}"
    version = next_version(known[0].version if known else None, cfg.bump)
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
        "test_split_sha256": split["sha256"],
        "test_images": split["images"],
        "champion": champion_version,
        "champion_score": champion,
        "champion_rescored": fair["rescored"],
    }
    gate = {"champion": champion_version, "champion_score": champion, "champion_own_split_score": fair["own_score"]}
    gate |= {"rescored": fair["rescored"], "split_change": fair["change"], "reason": reason}
    document = card.build(root, params, metrics, info, split=split, gate=gate)
    folder = root / REGISTRY_DIR / cfg.model
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "card.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    (folder / "card.md").write_text(card.markdown(document), encoding="utf-8")
    paths = [*to_commit, str(folder.relative_to(root))]
    git(root, "add", "--", *paths)
    verdict = f"promoted to {cfg.stage}" if promoted else f"not promoted: {reason}"
    # Only these paths: whatever else the user has staged stays staged, out of this commit.
    message = f"Register {cfg.model} {version}: test {cfg.metric} {candidate:.4f} ({verdict})"
    git(root, "commit", "-q", "-m", message, "--only", "--", *paths)
    head = git(root, "rev-parse", "HEAD").strip()
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
        "champion_own": fair["own_score"],
        "rescored": fair["rescored"],
        "rescore_cached": fair["cached"],
        "split": {k: split[k] for k in ("sha256", "images", "frozen")} | {"change": fair["change"]},
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
