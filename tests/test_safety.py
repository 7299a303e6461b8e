"""Safety properties checked on the code itself: no unpickling of files, servers on loopback, no debris."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segflow.io import atomic_dir, atomic_path
from segflow.ops.server import server_command
from segflow.stage import prune_scratch, stage_outputs
from tests.conftest import ROOT

SOURCES = sorted(p for folder in ("segflow", "tasks", "flows", "bench") for p in (ROOT / folder).rglob("*.py"))


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_code_path_unpickles_a_file():
    # torch.load only with weights_only=True; no pickle, joblib, or numpy pickles at all.
    offenders = []
    for path in SOURCES:
        for node, name in _calls(path):
            where = f"{path.relative_to(ROOT)}:{node.lineno} {name}"
            if name in ("pickle.load", "pickle.loads", "joblib.load", "dill.load", "cloudpickle.load"):
                offenders.append(where)
            if name == "torch.load":
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                if not weights_only or not (
                    isinstance(weights_only[0].value, ast.Constant) and weights_only[0].value.value
                ):
                    offenders.append(where)
            if any(k.arg == "weights_only" and getattr(k.value, "value", None) is False for k in node.keywords):
                offenders.append(where)  # e.g. Trainer.fit(ckpt_path=..., weights_only=False)
            if name in ("np.load", "numpy.load") and any(
                k.arg == "allow_pickle" and getattr(k.value, "value", False) for k in node.keywords
            ):
                offenders.append(where)
    assert not offenders, offenders
    assert any(name == "torch.load" for p in SOURCES for _, name in _calls(p)), "the scan sees the loads"


def test_servers_bind_to_loopback_only():
    command = server_command(4321)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    for path in SOURCES:
        assert "0.0.0.0" not in path.read_text(), f"{path} binds to every interface"


def test_stage_outputs_are_read_as_dvc_reads_them():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            if not stage.cmd:
                continue
            theirs = sorted((out.def_path, out.use_cache) for out in stage.outs)
            ours = sorted((str(path), cached) for path, cached in stage_outputs(stage.name, ROOT))
            assert ours == theirs, stage.name


def test_a_killed_write_leaves_hidden_debris_that_the_next_write_removes(tmp_path):
    final = tmp_path / "out"
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[2]); from segflow.io import atomic_dir\n"
        "with atomic_dir(__import__('pathlib').Path(sys.argv[1])) as tmp:\n"
        "    (tmp / 'half').write_text('x'); os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(final), str(ROOT)], check=False)
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.tmp-"), leftovers
    assert not final.exists(), "nothing that looks valid"
    # git ignores it meanwhile
    assert subprocess.run(["git", "check-ignore", "-q", f"data/{leftovers[0]}"], cwd=ROOT).returncode == 0
    with atomic_dir(final) as tmp:
        (tmp / "whole").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_path(tmp_path / "file.txt") as tmp:
        tmp.write_text("z")
    assert (tmp_path / "file.txt").read_text() == "z"


def test_scratch_of_dead_processes_is_pruned(tmp_path):
    scratch = tmp_path / ".segflow" / "tmp"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (scratch / f"train-{dead.pid}-123").mkdir(parents=True)
    mine = scratch / f"train-{os.getpid()}-{_start(os.getpid())}"
    mine.mkdir()
    removed = prune_scratch(tmp_path)
    assert [p.name for p in removed] == [f"train-{dead.pid}-123"]
    assert mine.exists()


def _start(pid: int) -> str:
    from segflow.proc import process_identity

    return process_identity(pid).split(":")[1]


@pytest.mark.parametrize("name", ["segflow.params", "tasks.ingest", "segflow.cli", "flows.pipeline"])
def test_importing_segflow_starts_nothing(name):
    # No import-time side effects: importing the packages creates no folders and starts no threads.
    before = set(os.listdir(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", f"import threading, {name}; print(threading.active_count())"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.stdout.strip() == "1"
    assert set(os.listdir(ROOT)) == before
