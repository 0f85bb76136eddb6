"""dvc.yaml against the code: every stage's deps are exactly the repository modules its command imports.

A module that a stage imports but does not list would let DVC skip the stage after a change there, and an
output could silently stop matching the code. The deps are exact per-file lists, not a folder dep on
`dq/`: a folder dep would rerun every stage (features for hours on ImageNet) after an edit to, say, the
report module. So the closure is computed here from the source, function-level imports included, and
compared both ways: nothing missing, nothing stale.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from dq.core.paths import DataPaths

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dq", "stages")  # the repository's own code
NOT_OUTPUTS = {"mae_resume", "train_resume", "teacher_resume", "rebuilt_cache"}  # resume checkpoints and the rebuilt cache must survive DVC's removal of outputs


def module_file(name: str) -> Path | None:
    """The source file of a repository module `a.b`, or None when it is not one of ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module that `path` imports anywhere (function bodies included), as absolute names."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            found.add(base)
            # `from dq import cam` imports the module dq.patches.cam; `from dq.patches.cam import x` only dq.patches.cam
            found.update(f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}"))
    return found


def import_closure(modules: list[str]) -> set[str]:
    """Repository files (relative paths) loaded by importing `modules`, parent packages included."""
    seen: set[str] = set()
    files: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:
            continue
        files.add(path.relative_to(ROOT).as_posix())
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # importing a.b runs a/__init__.py
        todo.extend(imported_modules(path, name))
    return files


def stage_modules(cmd: str) -> list[str]:
    """`python -m stages.x` → [stages.x]; the launcher also runs the stage it names."""
    words = cmd.split()
    assert words[:2] == ["python", "-m"], f"stage commands run modules: {cmd}"
    modules = [words[2]]
    if words[2] == "stages.launch":
        modules.append(f"stages.{words[3]}")
    return modules


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def code_deps(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if d.split("/")[0] in PACKAGES}


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_stage_deps_are_exactly_its_import_closure(name):
    stage = dvc_stages()[name]
    closure = import_closure(stage_modules(stage["cmd"]))
    deps = code_deps(stage)
    assert not closure - deps, f"{name}: imported but missing from deps in dvc.yaml: {sorted(closure - deps)}"
    assert not deps - closure, f"{name}: in deps but never imported: {sorted(deps - closure)}"


def test_closure_sees_function_level_and_package_imports(tmp_path):
    """The closure follows imports inside functions and the `from dq import x` form."""
    closure = import_closure(["stages.launch", "stages.train"])
    assert "dq/params.py" in closure  # launch imports it at module level
    assert "dq/__init__.py" in closure and "stages/__init__.py" in closure
    source = "def f():\n    from dq.patches import grid\n    import dq.core.errors\n"
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert {"dq.patches.grid", "dq.core.errors"} <= imported_modules(path, "stages.probe")


def test_today_missing_dep_is_caught():
    """A stage whose deps lose one imported module fails the check."""
    stage = dict(dvc_stages()["select"])
    deps = code_deps(stage) - {"dq/core/errors.py"}
    assert import_closure(stage_modules(stage["cmd"])) - deps == {"dq/core/errors.py"}


def test_every_artifact_path_is_declared_in_dvc_yaml():
    """dq.core.paths spells each path once; dvc.yaml declares each as some stage's output."""
    declared = set()
    for stage in dvc_stages().values():
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key, []):
                declared.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    paths = DataPaths(Path("data"))
    names = [n for n, v in vars(DataPaths).items() if isinstance(v, property)]
    assert names, "DataPaths has no paths"
    for name in names:
        if name in NOT_OUTPUTS:
            continue
        path = getattr(paths, name).as_posix()
        # a DVCLive folder is declared through the plots folder inside it
        assert any(path == d or path.startswith(d + "/") or d.startswith(path + "/") for d in declared), \
            f"DataPaths.{name} = {path} is no output"
    for split in ("train", "test"):
        assert paths.prepared_split(split).as_posix().startswith("data/prepared/")
    assert dataclasses.is_dataclass(DataPaths)


RECORDING_STAGES = ("select", "compress", "export")  # the stages whose outputs record their params


@pytest.mark.parametrize("name", RECORDING_STAGES)
def test_recorded_params_are_the_stage_s_params_in_dvc_yaml(name):
    """Each stage that writes its params into an output names them once (RECORDED_PARAMS, built by
    dq.params.Params.provenance) and says why the others are left out (NOT_RECORDED): together exactly the
    params dvc.yaml declares for it, so a record can neither miss a param that changes the output nor name
    one the stage does not read."""
    import importlib

    module = importlib.import_module(f"stages.{name}")
    declared = set(dvc_stages()[name]["params"])
    recorded, left_out = set(module.RECORDED_PARAMS), set(module.NOT_RECORDED)
    assert not recorded & left_out
    assert recorded | left_out == declared, (sorted(recorded | left_out), sorted(declared))
    from dq.params import Params

    record = Params().provenance(*module.RECORDED_PARAMS)
    for key in module.RECORDED_PARAMS:
        head, _, rest = key.partition(".")
        assert head in record and (not rest or rest in record[head]), key
