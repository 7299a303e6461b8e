"""dvc.yaml and the code cannot drift apart.

For every stage `x` in dvc.yaml: its command is `python -m tasks.x`; tasks/x.py
has run() and main(); params.yaml has a section `x:` typed by `XParams`; the
stage's deps list exactly the project modules the stage imports (so a code
change reruns the stages it affects, and only those); the params sections the
module reads are declared; its outputs live under ${paths.x}.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

import tasks.params as params_module
from tasks.params import Params
from tests.conftest import ROOT

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]


def _tree(module: str) -> ast.Module:
    return ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())


def project_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """Every `tasks.*` module `module` imports, directly or through other project modules."""
    seen = set() if seen is None else seen
    for node in ast.walk(_tree(module)):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tasks":
            # `from tasks import _viz` imports a module; `from tasks.x import y` imports tasks.x.
            names = [f"tasks.{a.name}" for a in node.names] if node.module == "tasks" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "tasks"]
        for name in names:
            if (ROOT / (name.replace(".", "/") + ".py")).is_file() and name not in seen:
                seen.add(name)
                project_imports(name, seen)
    return seen


def params_read(module: str) -> set[str]:
    """The params keys a stage module reads, as dotted paths (`params.augment.normalize.mean`
    reads `augment.normalize.mean`; `cfg = params.train` reads all of `train`)."""
    tree = _tree(module)
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    chains = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue  # only whole chains: `params.a.b`, not its part `params.a`
        parts = []
        while isinstance(node, ast.Attribute):
            parts.insert(0, node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id == "params" and parts[0] in Params.model_fields:
            chains.add(".".join(parts))
    return chains


def _module_file(name: str) -> str:
    return name.replace(".", "/") + ".py"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_command_and_module(stage):
    spec = STAGES[stage]
    assert spec["cmd"] == f"python -m tasks.{stage}"
    tree = _tree(f"tasks.{stage}")
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert {"run", "main"} <= functions, f"tasks/{stage}.py needs run() and main()"
    assert "__main__" in (ROOT / f"tasks/{stage}.py").read_text(), f"tasks/{stage}.py must run as a module"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_params_section(stage):
    assert stage in Params.model_fields, f"params.yaml has no section '{stage}:'"
    assert stage in yaml.safe_load((ROOT / "params.yaml").read_text())
    model = getattr(params_module, f"{stage.capitalize()}Params")
    assert Params.model_fields[stage].annotation is model


@pytest.mark.parametrize("stage", STAGES)
def test_stage_code_deps_match_imports(stage):
    declared = {d for d in STAGES[stage]["deps"] if d.startswith("tasks/")}
    imported = {_module_file(m) for m in project_imports(f"tasks.{stage}")} | {f"tasks/{stage}.py"}
    imported.discard("tasks/__init__.py")
    assert declared == imported, (
        f"stage {stage}: missing from deps {sorted(imported - declared)}, "
        f"listed but not imported {sorted(declared - imported)}"
    )


@pytest.mark.parametrize("stage", STAGES)
def test_stage_declares_the_params_it_reads(stage):
    # DVC reruns a stage only for the params keys dvc.yaml lists: each key read must be covered.
    declared = set(STAGES[stage].get("params", []))
    assert stage in declared
    # paths reach DVC through ${paths.x} in deps and outs.
    read = {key for key in params_read(f"tasks.{stage}") if not key.startswith("paths")}
    assert read, f"tasks/{stage}.py reads no params?"
    uncovered = {key for key in read if not any(key == d or key.startswith(d + ".") for d in declared)}
    assert not uncovered, f"stage {stage} reads params {sorted(uncovered)} that dvc.yaml does not list"


def test_params_read_sees_whole_chains():
    assert params_read("tasks.train") >= {"train", "augment.normalize.for_channels", "augment.crop_size", "seed"}
    assert "augment" not in params_read("tasks.train")


@pytest.mark.parametrize("stage", STAGES)
def test_stage_outputs_live_under_its_path(stage):
    spec = STAGES[stage]
    outputs = list(spec.get("outs", []))
    for key in ("metrics", "plots"):
        outputs += [next(iter(o)) if isinstance(o, dict) else o for o in spec.get(key, [])]
    assert outputs, f"stage {stage} declares no outputs"
    for out in outputs:
        assert re.match(rf"^\$\{{paths\.{stage}\}}(/|$)", out), f"{stage}: output {out} is outside ${{paths.{stage}}}"


def test_stage_inputs_are_upstream_outputs():
    # A data dep written as ${paths.x}... must name an earlier stage, so DVC sees the edge.
    order = list(STAGES)
    for index, stage in enumerate(order):
        for dep in STAGES[stage]["deps"]:
            found = re.match(r"^\$\{paths\.(\w+)\}", dep)
            if found:
                assert found.group(1) in order[:index], f"{stage} depends on {dep}, not an upstream stage's output"


def test_every_stage_module_is_in_the_graph():
    modules = {p.stem for p in (ROOT / "tasks").glob("*.py") if not p.stem.startswith("_")} - {"params"}
    assert modules == set(STAGES)


def test_flow_runs_the_stages_in_dvc_order():
    from flows._plan import stage_order

    assert stage_order(ROOT) == list(STAGES)


def test_paths_section_is_what_dvc_interpolates():
    written = yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]
    assert set(written) == set(STAGES)
    assert all(Path(v).parts[0] == "data" for v in written.values())
