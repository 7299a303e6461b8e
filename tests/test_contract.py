"""dvc.yaml and the code cannot drift apart.

For every stage `x` in dvc.yaml: its command is `python -m tasks.x`; tasks/x.py
is a thin main() calling a library run(); params.yaml has a section `x:` typed by `XParams`; the
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

import segflow.params as params_module
from segflow import deps
from segflow.params import Params
from tests.conftest import ROOT

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]


def _tree(module: str) -> ast.Module:
    return ast.parse(deps.module_file(module, ROOT).read_text())


def run_module(stage: str) -> str:
    """The library module whose ``run`` the stage entry point ``tasks/<stage>.py`` calls."""
    for node in _tree(f"tasks.{stage}").body:
        if isinstance(node, ast.ImportFrom) and any(a.name == "run" for a in node.names):
            return node.module
    raise AssertionError(f"tasks/{stage}.py imports no run() from the library")


def family_modules(stage: str) -> list[str]:
    """The library modules that do a stage's work: its run() module and the task families' run() modules
    that one hands over to (segflow/train.py: segflow.semantic.train or segflow.instance.train)."""
    first = run_module(stage)
    found = [first]
    for node in ast.walk(_tree(first)):
        if isinstance(node, ast.ImportFrom) and node.module and any(a.name == "run" for a in node.names):
            found.append(node.module)
    return found


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


@pytest.mark.parametrize("stage", STAGES)
def test_stage_command_and_module(stage):
    spec = STAGES[stage]
    assert spec["cmd"] == f"python -m tasks.{stage}"
    tree = _tree(f"tasks.{stage}")
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert functions == {"main"}, f"tasks/{stage}.py is an entry point: main() only, the work is the library's"
    assert "__main__" in (ROOT / f"tasks/{stage}.py").read_text(), f"tasks/{stage}.py must run as a module"
    library = run_module(stage)
    assert library.startswith("segflow."), library
    library_functions = {node.name for node in _tree(library).body if isinstance(node, ast.FunctionDef)}
    assert "run" in library_functions, f"{library} has no run()"
    # The entry point stays thin: a few lines around preflight and stage_main.
    assert len((ROOT / f"tasks/{stage}.py").read_text().splitlines()) < 40


@pytest.mark.parametrize("stage", STAGES)
def test_stage_params_section(stage):
    assert stage in Params.model_fields, f"params.yaml has no section '{stage}:'"
    assert stage in yaml.safe_load((ROOT / "params.yaml").read_text())
    model = getattr(params_module, f"{stage.capitalize()}Params")
    assert Params.model_fields[stage].annotation is model


@pytest.mark.parametrize("stage", STAGES)
def test_stage_code_deps_match_imports(stage):
    declared = {d for d in STAGES[stage]["deps"] if d.startswith(("tasks/", "segflow/"))}
    imported = {str(f.resolve().relative_to(ROOT)) for f in deps.code_files(f"tasks.{stage}", ROOT)}
    assert f"tasks/{stage}.py" in imported and any(f.startswith("segflow/") for f in imported)
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
    read = {key for m in family_modules(stage) for key in params_read(m) if not key.startswith("paths")}
    assert read, f"tasks/{stage}.py reads no params?"
    uncovered = {key for key in read if not any(key == d or key.startswith(d + ".") for d in declared)}
    assert not uncovered, f"stage {stage} reads params {sorted(uncovered)} that dvc.yaml does not list"


def test_each_family_does_the_work_of_the_model_stages():
    for stage in ("train", "evaluate", "export"):
        assert family_modules(stage) == [f"segflow.{stage}", f"segflow.instance.{stage}", f"segflow.semantic.{stage}"]


def test_params_read_sees_whole_chains():
    read = params_read("segflow.semantic.train")
    assert read >= {"train", "augment.normalize.for_channels", "augment.crop_size", "seed"}
    assert "augment" not in read


@pytest.mark.parametrize("stage", STAGES)
def test_stage_outputs_live_under_its_path(stage):
    spec = STAGES[stage]
    outputs = []
    for key in ("outs", "metrics", "plots"):
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
    from segflow.ops.plan import stage_order

    assert stage_order(ROOT) == list(STAGES)


def test_paths_section_is_what_dvc_interpolates():
    written = yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]
    assert set(written) == set(STAGES)
    assert all(Path(v).parts[0] == "data" for v in written.values())
