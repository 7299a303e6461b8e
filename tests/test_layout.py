"""The package layout: one installed library, thin entry points, no import circles, a cheap ``import segflow``.

Read from the source (``segflow.deps`` walks imports with ``ast``) and checked in fresh interpreters,
so a circle that only works through function-level imports, or a heavy import at the top of the
public API, fails here rather than in a user's service.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from segflow import deps
from tests.conftest import ROOT


def _modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "segflow").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    for folder in ("tasks", "flows"):
        names += [f"{folder}.{p.stem}" for p in sorted((ROOT / folder).glob("*.py")) if p.stem != "__init__"]
    return names


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {d for d in deps.direct_imports(m, ROOT) if d in modules and d != m} for m in modules}


def test_no_import_circles_anywhere():
    assert _cycles(_graph()) == []


def test_the_circle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_dependencies_point_down():
    graph = _graph()
    assert graph["segflow.errors"] == set(), "errors.py is a leaf"
    for module, imported in graph.items():
        if module.startswith(("segflow.data", "segflow.semantic")):
            upward = {m for m in imported if m.startswith(("segflow.ops", "segflow.registry", "segflow.cli"))}
            assert not upward, f"{module} imports {sorted(upward)}"
        if module.startswith("segflow.") and module != "segflow.cli":
            assert "segflow.cli" not in imported
        assert not any(m.startswith(("tasks", "flows")) for m in imported if module.startswith("segflow")), module


def test_stage_deps_follow_the_library():
    code = {str(p.relative_to(ROOT)) for p in deps.code_files("tasks.train", ROOT)}
    assert {"tasks/train.py", "segflow/semantic/module.py", "segflow/stage.py", "segflow/errors.py"} <= code
    assert not any(path.startswith(("segflow/ops", "segflow/registry")) for path in code), code


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_only_segflow_is_importable_outside_the_project(tmp_path):
    heavy = ("torch", "prefect", "dvc", "lightning", "numpy", "pandas", "albumentations")
    probe = _python(
        "import sys, segflow; assert callable(segflow.load_model); "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r} and m != 'numpy'))",
        tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    for name in ("tasks", "flows"):
        result = _python(f"import {name}", tmp_path)
        assert result.returncode != 0 and "No module named" in result.stderr, f"{name} is installed"


def test_import_segflow_loads_no_heavy_library(tmp_path):
    heavy = ("torch", "prefect", "dvc", "lightning", "numpy", "pandas", "albumentations", "pydantic")
    probe = _python(
        f"import sys, segflow; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))", tmp_path
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]", probe.stdout


def test_cli_help_is_plain_text():
    result = subprocess.run([str(Path(sys.executable).parent / "segflow"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "``" not in result.stdout and ":func:" not in result.stdout, result.stdout


def test_every_benchmark_imports():
    # A benchmark that no longer imports (a moved helper) fails here, not at the next `make bench`.
    import importlib

    names = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("_"))
    assert {"run", "pipeline", "train", "predict", "reliability"} <= set(names)
    for name in names:
        importlib.import_module(f"bench.{name}")
