"""The house rules of issue 37, kept: no import cycles in dq/, small modules and signatures, and benchmarks and
stages that use dq's public names only (bench/ imports no stage)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 500
MAX_PARAMETERS = 7


def _module_name(path: Path) -> str:
    name = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
    return name.removesuffix(".__init__")


MODULES = {_module_name(p): p for p in sorted((ROOT / "dq").rglob("*.py"))}


def _outside_type_checking(tree: ast.AST):
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    return (node for node in ast.walk(tree) if id(node) not in skipped)


def _owner(name: str) -> str | None:
    """The dq module that importing `name` runs last (a module, or the package of an attribute)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """The dq modules `module` imports anywhere (function bodies included; type-only imports excluded), without
    the packages above it, which Python runs first anyway."""
    found = set()
    for node in _outside_type_checking(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found.update(_owner(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.update(_owner(f"{node.module}.{a.name}") for a in node.names)
    return {m for m in found if m and m != module and not module.startswith(f"{m}.")}


def test_dq_has_no_import_cycles():
    graph = {m: imports_of(m) for m in MODULES}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path[path.index(dep):] + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_signatures_stay_small(module):
    text = MODULES[module].read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{module}: over {MAX_MODULE_LINES} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [x.arg for x in (a.vararg, a.kwarg) if x]
            count = len(names) - (names[:1] in (["self"], ["cls"]))
            assert count <= MAX_PARAMETERS, f"{module}.{node.name}: {count} parameters (at most {MAX_PARAMETERS})"


def test_stages_and_bench_use_public_names_and_bench_no_stage():
    for path in sorted((ROOT / "stages").glob("*.py")) + sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("dq", "stages"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private {private} from {node.module}"
            if path.parent.name == "bench":
                names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                assert not any(n.split(".")[0] == "stages" for n in names), f"bench/{path.name} imports a stage"


def test_the_cycle_check_sees_a_function_level_import(tmp_path, monkeypatch):
    """A guard for the guard: an import inside a function counts."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from dq.b import g\n")
    b.write_text("import dq.a\n")
    monkeypatch.setitem(MODULES, "dq.a", a)
    monkeypatch.setitem(MODULES, "dq.b", b)
    assert imports_of("dq.a") == {"dq.b"} and imports_of("dq.b") == {"dq.a"}
    with pytest.raises(AssertionError, match="import cycle"):
        test_dq_has_no_import_cycles()
