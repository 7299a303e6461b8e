"""Which of the project's source files a module runs: its imports, followed through segflow and tasks.

Read from the source with ``ast`` (nothing is imported), so it can tell a DVC stage's code deps
(``tests/test_contract.py`` keeps dvc.yaml equal to it) and key a training run's checkpoints to the
code that trains (a change to any of those files starts training afresh instead of resuming).
"""

from __future__ import annotations

import ast
from pathlib import Path

#: The installed library's folder and the project root beside it (where ``tasks/`` lives when run from a clone).
PACKAGE = Path(__file__).resolve().parent
OURS = ("segflow", "tasks", "flows")


def module_file(name: str, root: Path | None = None) -> Path | None:
    """The file of module ``name`` (``segflow.x.y`` under the package, ``tasks.x`` under ``root``), or None."""
    parts = name.split(".")
    if parts[0] not in OURS:
        return None
    base = PACKAGE.parent if parts[0] == "segflow" else Path(root or Path.cwd())
    for candidate in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def direct_imports(name: str, root: Path | None = None) -> set[str]:
    """The project modules ``name`` imports anywhere in its body (function-level imports too)."""
    path = module_file(name, root)
    if path is None:
        return set()
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in OURS:
                continue
            # `from segflow.semantic import infer` imports the module segflow.semantic.infer (the package's
            # __init__ runs too, but holds no code); `from segflow.io import x` imports segflow.io.
            subs = {f"{node.module}.{alias.name}" for alias in node.names}
            modules = {sub for sub in subs if module_file(sub, root) is not None}
            found |= modules if modules == subs else {node.module, *modules}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in OURS}
    return {m for m in found if module_file(m, root) is not None}


def imports(name: str, root: Path | None = None) -> set[str]:
    """Every project module ``name`` imports, directly or through other project modules (``name`` included)."""
    seen = {name}
    todo = [name]
    while todo:
        for found in direct_imports(todo.pop(), root):
            if found not in seen:
                seen.add(found)
                todo.append(found)
    return seen


def code_files(name: str, root: Path | None = None) -> list[Path]:
    """The source files of :func:`imports`, package ``__init__`` files left out (they hold no code), sorted."""
    files = {module_file(m, root) for m in imports(name, root)}
    return sorted(f for f in files if f is not None and f.name != "__init__.py")
