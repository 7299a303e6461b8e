"""What a run has to do, decided in-process from DVC's own view of the project.

A scheduled run that finds nothing changed is the most common run; asking
DVC once (``Repo.status``) which stages are stale, plus everything
downstream of them, lets the flow start DVC only for those.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import networkx as nx


def stage_order(root: Path | str = ".") -> list[str]:
    """The pipeline stages of the DVC project at ``root``, dependencies first.

    Uses DVC's own planner over the ``dvc.yaml`` graph, so this order is the one ``dvc repro`` would
    take. Data tracked by ``.dvc`` files has no command and is left out.
    """
    from dvc.repo import Repo
    from dvc.repo.reproduce import plan_repro

    with Repo(str(root)) as repo:
        # stage.name, not stage.addressing: the latter is relative to the current folder, not the project.
        return [stage.name for stage in plan_repro(repo.index.graph) if stage.cmd]


def stages_to_run(
    root: Path | str, force: bool = False, targets: list[str] | None = None
) -> tuple[list[str], set[str]]:
    """The stages a run covers (in order) and those of them DVC would run now.

    Args:
        force: every covered stage runs (``dvc repro --force``).
        targets: only these stages and what they depend on (default: the whole pipeline).

    Returns:
        (covered stages in run order, the stale ones: changed themselves or downstream of a change).

    Raises:
        ValueError: a target that is no stage of dvc.yaml.
    """
    from dvc.repo import Repo
    from dvc.repo.reproduce import plan_repro

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        by_name = {stage.name: stage for stage in graph.nodes if stage.cmd}
        order = [stage.name for stage in plan_repro(graph) if stage.cmd]
        if targets:
            unknown = sorted(set(targets) - set(order))
            if unknown:
                raise ValueError(f"no stage named {', '.join(unknown)} in dvc.yaml; stages: {', '.join(order)}")
            covered = set(targets)
            for name in targets:
                covered |= {s.name for s in nx.descendants(graph, by_name[name]) if s.cmd}
            order = [name for name in order if name in covered]
        if force:
            return order, set(order)
        changed = set(repo.status())
        stale = set()
        for stage in graph.nodes:
            if stage.addressing in changed and stage.cmd:
                stale |= {stage.name} | {s.name for s in nx.ancestors(graph, stage) if s.cmd}
        return order, stale & set(order)


def changed_sources(root: Path | str) -> list[str]:
    """The ``.dvc`` files (data tracked by ``dvc add``) whose data changed since they were written.

    ``dvc repro`` records the new version of such data in its ``.dvc`` file before running what depends on
    it ("Verifying data sources"); ``dvc repro --single-item`` does not, so the flow does it
    (:func:`segflow.ops.pipeline._run_stages`), or ``dvc status`` would stay dirty after the run.
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        changed = set(repo.status())
        return sorted(s.addressing for s in repo.index.graph.nodes if not s.cmd and s.addressing in changed)


def has_remote(root: Path | str) -> bool:
    """Whether the project has a DVC remote (then scheduled runs pull before and push after)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return bool(repo.config.get("remote"))


def dvc(root: Path | str, *args: str) -> tuple[int, str]:
    """Run a DVC command in the project; return (exit status, combined output)."""
    from segflow.ops.env import stage_env

    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=stage_env(), capture_output=True, text=True
    )
    return proc.returncode, (proc.stdout + proc.stderr).strip()
