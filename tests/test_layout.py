"""The house's shape, measured: every import in nstd/ (those inside functions too) runs down the
floors below, no module imports itself back through others, and no module outgrows a reader.
docs/development.md#layout draws the same floors."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "nstd"

#: Each part of nstd and its floor: a part may import its own modules and those on lower floors.
FLOORS = {
    "cli": 9,
    "commands": 8,
    "distributed": 7, "web": 7,
    "daemon": 6,
    "config": 5, "audit": 5,
    "job": 4,
    "state": 3,
    "engine": 2,
    "errors": 0, "schema": 1, "logs": 1, "fsutil": 1, "yamltext": 1, "timetext": 1, "terminal": 1,
    "report": 1, "__init__": 1,
}
#: Lines a module may have (the redesign's bound is about 350).
MAX_LINES = 360


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT.parent).with_suffix("").parts): p for p in sorted(ROOT.rglob("*.py"))}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The nstd modules `module` imports, wherever in it (a package's import counts as its __init__)."""
    out = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("nstd") and name != module:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods) | {m.removesuffix(".__init__") for m in mods}
    graph = {}
    for mod, path in mods.items():
        name = mod.removesuffix(".__init__")
        graph[name] = {i for i in _imports(name, path, known) if i != name}
    return graph


def test_every_part_has_a_floor():
    assert {_part(m.removesuffix(".__init__")) for m in _modules()} <= set(FLOORS)


def test_no_import_runs_up_or_across():
    wrong = []
    for mod, deps in _graph().items():
        for dep in deps:
            a, b = _part(mod), _part(dep)
            if b == "__init__" and dep == "nstd":
                continue  # the version
            if a != b and FLOORS[b] >= FLOORS[a]:
                wrong.append(f"{mod} -> {dep}")
    assert not wrong, "imports that run up (or across one floor): " + ", ".join(sorted(wrong))


def test_no_circle_of_imports():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            pytest.fail("a circle of imports: " + " -> ".join(circle))


def test_no_module_outgrows_a_reader():
    long = {str(p.relative_to(ROOT.parent)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_checks_see_a_wrong_arrow(tmp_path, monkeypatch):
    """The rule itself: an import from the state up to the daemon is reported."""
    graph = {"nstd.state.store": {"nstd.daemon.worker"}, "nstd.daemon.worker": {"nstd.state.store"}}
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: graph)
    with pytest.raises(AssertionError, match="nstd.state.store -> nstd.daemon.worker"):
        test_no_import_runs_up_or_across()
    with pytest.raises(pytest.fail.Exception, match="a circle of imports"):
        test_no_circle_of_imports()
