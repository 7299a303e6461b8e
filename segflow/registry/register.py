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
   assigns the stage when the candidate wins (or nothing holds it yet);
5. pushes the registration commit and its tags to git's ``origin`` when there is one (``register.push``;
   :mod:`segflow.registry.publish`), merging origin's branch first when another machine pushed."""

from __future__ import annotations

import datetime
import json
import os
import signal
import time
from pathlib import Path

from segflow.errors import SegflowError
from segflow.layout import METRICS, read_scores
from segflow.ops.plan import dvc, has_remote
from segflow.params import Params, load_params
from segflow.proc import Held, exclusive
from segflow.registry import card, publish
from segflow.registry.fetch import versions
from segflow.registry.gate import decide, fair_champion, metric_of, next_version
from segflow.registry.git import git
from segflow.registry.provenance import provenance
from segflow.stage import STATE_DIR, stage_outputs

REGISTRY_DIR = Path("registry")
#: One registration at a time in a repository.
LOCK_FILE = STATE_DIR / "register.lock"
#: Test-only fault injection (see :func:`_fault`).
FAULT_ENV = "SEGFLOW_FAULT"


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


def _check_ready(root: Path, params: Params, commit: bool, allow_dirty: bool) -> tuple[list[str], list[str]]:
    """Refuse a stale pipeline, uncommitted pipeline files or (unless ``allow_dirty``) other uncommitted changes.

    Returns:
        (the pipeline files to commit, the other files with uncommitted changes: recorded when allowed).

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
    if others and not allow_dirty:
        raise SegflowError(
            f"uncommitted changes to {', '.join(others[:4])}{' ...' if len(others) > 4 else ''}: commit them "
            "(the registered version must say which code made it), then register; or register anyway with "
            "--allow-dirty (the card records the files)"
        )
    if pipeline and not commit:
        raise SegflowError(
            f"uncommitted pipeline results ({', '.join(pipeline[:4])}{' ...' if len(pipeline) > 4 else ''}): "
            "git add and commit them, or set register.commit: true (segflow register --commit)"
        )
    return pipeline, others


def register(root: Path | str = ".", commit: bool | None = None, allow_dirty: bool = False) -> dict:
    """Register the workspace's model as the next version; promote it through the gate.

    One registration at a time per repository (a lock; a second one gets one line). A registration is
    one unit: the card commit, the version tag and the stage tag. One that was killed between them is
    completed by the next ``register`` (from the card it committed), before anything else.

    Args:
        commit: commit the pipeline's results first (default: ``register.commit``).
        allow_dirty: register although other tracked files have uncommitted changes (the card lists them).

    Returns:
        The outcome: model, version, registered, promoted, stage, metric, candidate, champion,
        champion_version, reason, commit, tag.

    Raises:
        SegflowError: a stale pipeline, uncommitted files, no model or metrics, or a git/GTO failure.
    """
    root = Path(root).resolve()
    params = load_params(root / "params.yaml")
    push = publish.wanted(root, params.register.push)  # register.push: true without an origin fails first
    try:
        with exclusive(root / LOCK_FILE):
            before = git(root, "rev-parse", "HEAD", check=False).strip()
            outcome = _register(root, params, params.register.commit if commit is None else commit, allow_dirty)
            if push and (outcome.get("registered") or outcome["completed"]):
                outcome["pushed"] = _push(root, params.register.model, outcome, before)
            return outcome
    except Held as held:
        raise SegflowError(
            f"{root}: another segflow register is registering in this repository ({held.holder}); "
            "wait for it to finish, then run segflow register again"
        ) from None


def _register(root: Path, params: Params, commit: bool, allow_dirty: bool) -> dict:
    cfg = params.register
    completed = _complete_interrupted(root, cfg.model)
    to_commit, dirty = _check_ready(root, params, commit, allow_dirty)
    warnings = [] if _on_branch(root) else ["HEAD is detached: the registration commit is on no branch"]
    metrics = read_scores(root / params.paths.evaluate)
    if metrics is None:
        raise SegflowError(
            f"{root / params.paths.evaluate / METRICS}: not found; run the pipeline (segflow run) before registering"
        )
    candidate = metric_of(metrics, cfg.metric)
    origin = provenance(root)
    known = versions(root, cfg.model)
    outcome = {"model": cfg.model, "metric": cfg.metric, "direction": cfg.direction, "candidate": candidate}
    outcome |= {"completed": completed, "warnings": warnings}
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
    version = next_version(_latest_tagged(root, cfg.model, known), cfg.bump)
    if has_remote(root):
        code, output = dvc(root, "push")
        if code != 0:
            raise SegflowError(f"dvc push failed before registering: {output.splitlines()[-1] if output else code}")
    if to_commit:
        # The results first, in their own commit: the version's source commit then holds its dvc.lock.
        git(root, "add", "--", *to_commit)
        git(root, "commit", "-q", "-m", f"Pipeline results for {cfg.model} {version}", "--only", "--", *to_commit)
        origin = provenance(root)
        to_commit = []
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
        "dirty": dirty,
    }
    gate = {"champion": champion_version, "champion_score": champion, "champion_own_split_score": fair["own_score"]}
    gate |= {"rescored": fair["rescored"], "split_change": fair["change"], "reason": reason}
    document = card.build(root, params, metrics, info, split=split, gate=gate)
    document["tag_message"] = info  # what the version tag says: an interrupted registration is completed from it
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
    _fault("after-commit")
    _tag(root, cfg.model, head, info)
    _fault("after-version")
    if promoted:
        _assign(root, cfg.model, cfg.stage, version, reason)
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


def _push(root: Path, model: str, outcome: dict, before: str) -> dict:
    """The registration (or the interrupted one just completed) pushed to origin: its commit and tags."""
    path = f"{REGISTRY_DIR}/{model}/card.json"
    commit = outcome.get("commit") or git(root, "log", "-n", "1", "--format=%H", "--", path).strip()
    if not has_remote(root):
        outcome["warnings"].append(
            "origin gets the tags but no DVC remote holds the model's files, so other clones cannot fetch it: "
            "add one (dvc remote add -d NAME URL), then dvc push"
        )
    return publish.publish(root, model, commit, before or commit)


def _fault(point: str) -> None:
    """Test-only fault injection: ``SEGFLOW_FAULT=register:<point>`` SIGKILLs this process there."""
    if os.environ.get(FAULT_ENV) == f"register:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


def _on_branch(root: Path) -> bool:
    return bool(git(root, "symbolic-ref", "-q", "HEAD", check=False).strip())


def _latest_tagged(root: Path, model: str, known: list) -> str | None:
    """The highest version of ``model`` among GTO's versions and every ``model@v*`` git tag (a deprecated or
    hand-made tag still takes its number: never two versions with one number)."""
    found = {v.version for v in known}
    found |= {t.split("@", 1)[1] for t in git(root, "tag", "--list", f"{model}@v*", check=False).split()}
    numbers = [tuple(int(x) for x in v.lstrip("v").split(".")) for v in found if v.lstrip("v").count(".") == 2]
    return "v" + ".".join(map(str, max(numbers))) if numbers else None


def _tag(root: Path, model: str, commit: str, info: dict) -> None:
    from gto import api
    from gto.exceptions import GTOException

    try:
        api.register(str(root), model, commit, version=info["version"], message=json.dumps(info, sort_keys=True))
    except GTOException as error:
        raise SegflowError(
            f"gto could not tag {model}@{info['version']} ({' '.join(str(error).split())}); run segflow register "
            "again: it completes the registration from the committed card"
        ) from None


def _assign(root: Path, model: str, stage: str, version: str, reason: str, attempts: int = 3) -> None:
    """``gto assign``, retried: a failure between the version tag and the stage tag must not stick."""
    from gto import api
    from gto.exceptions import GTOException

    for attempt in range(1, attempts + 1):
        try:
            api.assign(str(root), model, stage, version=version, message=json.dumps({"reason": reason}))
            return
        except GTOException as error:
            if attempt == attempts:
                raise SegflowError(
                    f"gto could not assign {stage} to {model}@{version} ({' '.join(str(error).split())}); "
                    "run segflow register again: it completes the assignment"
                ) from None
            time.sleep(attempt)


def _complete_interrupted(root: Path, model: str) -> list[str]:
    """Finish a registration that was killed after committing its card: its version tag, then its stage tag.

    Returns:
        What was completed, one line each (nothing when the registry is consistent).
    """
    path = f"{REGISTRY_DIR}/{model}/card.json"
    commit = git(root, "log", "-n", "1", "--format=%H", "--", path, check=False).strip()
    if not commit:
        return []
    try:
        info = json.loads(git(root, "show", f"{commit}:{path}")).get("tag_message")
    except ValueError:
        return []
    if not info:  # a card from before registrations could be completed
        return []
    done = []
    tag = f"{model}@{info['version']}"
    at_commit = git(root, "tag", "--points-at", commit, check=False).split()
    # GTO marks a deregistered version with `<tag>!...`: the user's decision, not an interruption.
    deregistered = git(root, "tag", "--list", f"{tag}!*", check=False).split()
    if tag not in at_commit and not deregistered:
        if git(root, "tag", "--list", tag, check=False).strip():
            raise SegflowError(
                f"{tag} already tags another commit than its card ({commit[:12]}); the registry was changed by "
                f"hand: delete one of them (git tag -d {tag}, or git revert {commit[:12]}), then register"
            )
        _tag(root, model, commit, info)
        done.append(f"completed an interrupted registration: tagged {tag} (its card was committed, its tag was not)")
        _fault("after-version")
    stage = info.get("promoted_to")
    if stage and not any(t.startswith((f"{model}#{stage}#", f"{model}#{stage}!#")) for t in at_commit):
        _assign(root, model, stage, info["version"], "completing an interrupted registration")
        done.append(f"completed an interrupted registration: assigned {stage} to {tag}")
    return done


def summary_line(outcome: dict) -> str:
    """The outcome in one line, for the terminal and the dashboard."""
    metric = f"{outcome['metric']} {outcome['candidate']:.4f}"
    if not outcome["registered"]:
        return f"{outcome['model']}: nothing registered, {outcome['reason']}"
    champion = (
        f"against {outcome['champion_version']} {outcome['champion']:.4f}" if outcome["champion"] is not None else ""
    )
    pushed = outcome.get("pushed")
    count = f"{len(pushed['tags'])} tag{'s' if len(pushed['tags']) != 1 else ''}" if pushed else ""
    shared = f"; pushed to origin ({pushed['branch'] or 'tags only'}, {count})" if pushed else ""
    if pushed and pushed["merged"]:
        shared += f" after merging origin's {pushed['branch']} (another machine pushed first)"
    if outcome["promoted"]:
        return (
            f"{outcome['tag']} registered and promoted to {outcome['stage']}: {metric} {champion} "
            f"({outcome['reason']}){shared}"
        )
    return f"{outcome['tag']} registered, not promoted: {metric} {champion}; {outcome['reason']}{shared}"
