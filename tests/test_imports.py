"""The package's import graph has no cycles, and every module imports on its own.

The graph is read statically (``ast``) from every import statement of each module: module level, inside
``try``/``if`` blocks and inside functions (a function-local import that closes a cycle is still a module
reaching back up a layer; it only fails later), but not ``if TYPE_CHECKING:`` blocks, which never run.
Registries that find their plug-ins by name (``importlib.import_module``: the methods in
`mtpeft.adapters.registry`, the packaged tasks in `mtpeft.data.tasks`) add no edge: the plug-ins import
the registry, never the other way. The layering this keeps is the one of docs/architecture.md: entry
points -> module -> methods / data / models / metrics -> utils.

``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg`` (whose
``__init__`` defines the name).
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "mtpeft"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Collects every import statement, nested ones included, except under ``if TYPE_CHECKING:``."""

    def __init__(self) -> None:
        self.found: list[ast.Import | ast.ImportFrom] = []

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        self.found.append(node)

    visit_ImportFrom = visit_Import

    def visit_If(self, node: ast.If) -> None:
        for child in node.orelse if _is_type_checking(node) else [node.test, *node.body, *node.orelse]:
            self.visit(child)


def import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    collector = _Imports()
    collector.visit(tree)
    return collector.found


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``module`` imports (module docstring)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    targets: set[str] = set()
    for node in import_nodes(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            source = _absolute(node, module, path.name == "__init__.py")
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        targets |= {name for name in names if name in modules and name != module}
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_path(graph, component) for component in components]


def _cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A cycle through the first module of ``component``, for the failure message."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for target in sorted(graph[node] & members):
            if target == start:
                return [*paths[node], start]
            if target not in paths:
                paths[target] = [*paths[node], target]
                frontier.append(target)
    return component


def test_the_scanner_finds_cycles_and_every_import_but_type_checking_ones(tmp_path: Path) -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    source = (
        "from typing import TYPE_CHECKING\nimport mtpeft.run\nif TYPE_CHECKING:\n    import mtpeft.eval\n"
        "try:\n    from mtpeft.utils import sweep\nexcept ImportError:\n    pass\n"
        "from . import module\nfrom .utils.tables import print_table\n"
        "def f():\n    import mtpeft.study\n"
        "class C:\n    def g(self):\n        if True:\n            from mtpeft.results import load\n"
    )
    (tmp_path / "x.py").write_text(source)
    modules = all_modules()
    found = imports_of("mtpeft.x", tmp_path / "x.py", modules)
    expected = {"mtpeft.run", "mtpeft.utils.sweep", "mtpeft.module", "mtpeft.utils.tables", "mtpeft.study"}
    assert found == expected | {"mtpeft.results.load"}  # not mtpeft.eval (TYPE_CHECKING only)


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 50 and graph["mtpeft.run"]  # the scan sees the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (module -> imported module): " + "; ".join(
        " -> ".join(cycle) for cycle in cycles
    )


@pytest.mark.parametrize("module", sorted(all_modules()))
def test_every_module_imports(module: str) -> None:
    """Each module imports (its import-time dependencies exist). ``__main__`` modules are entry scripts
    run with ``python -m``: they are only parsed (importing them would run them)."""
    if module.endswith("__main__"):
        ast.parse(all_modules()[module].read_text())
        return
    if module in sys.modules:
        return
    try:
        importlib.import_module(module)
    except ImportError as err:  # an optional extra that this environment lacks is not an error here
        if err.name and not err.name.startswith(PACKAGE):
            pytest.skip(f"{module} needs the optional package {err.name}")
        raise


def test_a_fresh_interpreter_imports_each_layer_first() -> None:
    """Importing a low-layer module first, in a fresh interpreter, works (a cycle would show here as a
    partially initialised module when the wrong module is imported first)."""
    first = ["mtpeft.data.tasks", "mtpeft.data.packaged.humaneval", "mtpeft.adapters.base", "mtpeft.record"]
    code = "; ".join(f"import {name}" for name in first) + "; import mtpeft.run, mtpeft.results"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
