"""Publishing a registration to the team: its commit and GTO tags pushed to the git remote ``origin``.

A registration made on one machine is a version for everyone only once ``origin`` has its tags, and the
tags are worth something only once the DVC remote holds the files they name: :func:`register` pushes to
DVC before it tags, and this module pushes to git after.

Another machine may have pushed first. The branch is then merged with origin's (``git fetch`` + ``git
merge``) and pushed again. A merge, not a rebase: rebasing would rewrite the registration commit, so its
tags would name a commit origin never gets, and the card's ``source_commit`` (the commit whose dvc.lock
made the model) would vanish. When origin already holds one of this registration's tags (two machines
registered the same version number from the same base), nothing is pushed, the local registration is
undone (its tags deleted, the branch back where it was, its results uncommitted again: the state before
registering), and one line says so and what to run.
"""

from __future__ import annotations

from pathlib import Path

from segflow.errors import SegflowError
from segflow.registry.git import git, git_try

REMOTE = "origin"


def origin(root: Path) -> str | None:
    """The URL of the repository's ``origin``, or None when it has none."""
    code, url = git_try(root, "remote", "get-url", REMOTE)
    return url if code == 0 and url else None


def wanted(root: Path, setting: bool | str) -> bool:
    """Whether a registration pushes (``register.push``): ``auto`` pushes when there is an origin.

    Raises:
        SegflowError: ``register.push: true`` in a repository without an origin.
    """
    if setting == "auto":
        return origin(root) is not None
    if setting and origin(root) is None:
        raise SegflowError(
            "register.push is true but this git repository has no remote named origin: add it "
            "(git remote add origin URL), or set register.push: auto"
        )
    return bool(setting)


def tags_at(root: Path, commit: str, model: str) -> list[str]:
    """The model's GTO tags (version and stage) on ``commit``."""
    found = git(root, "tag", "--points-at", commit, "--list", f"{model}@*", f"{model}#*").split()
    return sorted(found, key=lambda t: ("#" in t, t))  # the version tag first


def _on_origin(root: Path, tags: list[str]) -> dict[str, str]:
    """Which of ``tags`` origin holds, and the object each one names there."""
    code, output = git_try(root, "ls-remote", "--tags", REMOTE, *(f"refs/tags/{t}" for t in tags))
    if code != 0:
        raise SegflowError(f"cannot read origin's tags (git ls-remote: {_last(output)}); the registration is local")
    found = {}
    for line in output.splitlines():
        sha, _, ref = line.partition("\t")
        if ref.startswith("refs/tags/") and not ref.endswith("^{}"):
            found[ref.removeprefix("refs/tags/")] = sha
    return found


def _clashes(root: Path, tags: list[str]) -> dict[str, str]:
    """Tags origin holds under the same name but for another object: another machine's registration."""
    remote = _on_origin(root, tags)
    return {t: remote[t] for t in tags if t in remote and remote[t] != git(root, "rev-parse", f"refs/tags/{t}").strip()}


def _last(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _undo(root: Path, model: str, tags: list[str], before: str) -> str:
    """Delete the registration's local tags and move the branch back to ``before``, the work tree as it was
    before registering: its results uncommitted again, the model cards as ``before`` has them.

    Returns:
        What could not be undone, as an instruction ("" when everything was).
    """
    git_try(root, "tag", "-d", *tags)
    code, output = git_try(root, "reset", "-q", "--mixed", before)
    if code != 0:
        return f" (could not move the branch back: {_last(output)}; run git reset {before[:12]})"
    cards = f"registry/{model}"
    if git_try(root, "cat-file", "-e", f"{before}:{cards}")[0] == 0:
        git_try(root, "checkout", "-q", before, "--", cards)
    else:
        for name in ("card.json", "card.md"):
            (root / cards / name).unlink(missing_ok=True)
    return ""


def publish(root: Path, model: str, commit: str, before: str, attempts: int = 3) -> dict:
    """Push the current branch and the model's tags on ``commit`` to origin, merging origin's branch when
    another machine pushed first.

    Args:
        commit: the registration commit (its tags are pushed).
        before: HEAD before the registration, where a clashing registration is undone to.
        attempts: pushes tried; between two, origin's branch is fetched and merged.

    Returns:
        ``{"remote", "branch", "tags", "merged"}``: what origin now holds of this registration.

    Raises:
        SegflowError: one line: origin already has one of these tags (the registration is undone here),
            origin's branch does not merge cleanly, or git cannot reach origin (the registration stays local).
    """
    tags = tags_at(root, commit, model)
    branch = git(root, "symbolic-ref", "-q", "--short", "HEAD", check=False).strip() or None
    refs = ([f"HEAD:refs/heads/{branch}"] if branch else []) + [f"refs/tags/{t}" for t in tags]
    for attempt in range(1, attempts + 1):
        merged = attempt - 1  # each retry follows one merge of origin's branch
        # --atomic: the branch and every tag, or nothing (never a tag on origin without its commit's history).
        code, output = git_try(root, "push", "--atomic", "--porcelain", REMOTE, *refs)
        if code == 0:
            return {"remote": origin(root), "branch": branch, "tags": tags, "merged": merged}
        if "rejected" not in output and "[remote rejected]" not in output:
            raise SegflowError(
                f"registered here as {tags[0] if tags else model} but git push to origin failed ({_last(output)}); "
                f"when origin is reachable run: git push --atomic origin {' '.join(refs)}"
            )
        if clash := _clashes(root, tags):
            tag, sha = next(iter(clash.items()))
            left = _undo(root, model, tags, before)
            raise SegflowError(
                f"origin already has {tag} (object {sha[:12]}): another machine registered that version first; "
                f"nothing was pushed and this registration was undone here (its results are uncommitted again){left}; "
                "run git pull, then "
                "segflow run --register to gate this clone's model against origin's"
            )
        if not branch or attempt == attempts:
            break
        code, output = git_try(root, "fetch", "-q", "--no-tags", REMOTE, branch)
        if code != 0:
            raise SegflowError(f"git fetch origin {branch} failed ({_last(output)}); the registration is local")
        code, output = git_try(root, "merge", "-q", "--no-edit", "FETCH_HEAD")
        if code != 0:
            git_try(root, "merge", "--abort")
            raise SegflowError(
                f"origin's {branch} changed and does not merge with this registration ({_last(output)}); it is "
                f"registered here only: run git pull, resolve, then git push --atomic origin {branch} {' '.join(tags)}"
            )
    raise SegflowError(
        f"origin kept rejecting the push of {' '.join(tags)} ({_last(output)}); registered here only: "
        f"run git pull, then git push --atomic origin {' '.join(refs)}"
    )
