"""The package's shape: no module imports, even lazily or for types only, a module that
imports it back (one place per concern, an order of layers that can be read)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "compressor"


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:  # from . import a, b
                    found |= {alias.name for alias in node.names}
        graph[path.stem] = found
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports()
    graph.pop("__init__")  # the package re-exports; no module imports it
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for name in sorted(graph.get(module, ())):
            if name in path:
                circles.append(" -> ".join([*path[path.index(name) :], name]))
            elif name in graph:
                visit(name, [*path, name])

    for module in sorted(graph):
        visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(sorted(set(circles))[:20])


def test_no_module_imports_the_package_itself():
    for path in PACKAGE.glob("*.py"):
        if path.stem == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and not node.module:
                names = {alias.name for alias in node.names}
                assert names <= {p.stem for p in PACKAGE.glob("*.py")}, (path.name, names)
