"""The package's shape (docs/architecture.md): folders by concern in layers, no import
circle (even lazily or for types only), techniques that never import each other, model
knowledge only in `compressor.models`, and an `__all__` that lists what `compressor` exports.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import compressor

PACKAGE = Path(compressor.__file__).parent

# What each part of the package may import (besides itself). The top-level contracts come
# first; every folder lists the layers below it. A folder missing here fails the test.
CONTRACTS = {"errors", "_io", "_version", "inputs", "data", "row"}
ALLOWED = {
    "errors": set(),
    "_version": set(),
    "_io": {"errors"},
    "inputs": {"errors"},
    "data": {"errors", "inputs"},
    "row": set(),
    "models": CONTRACTS,
    "runtime": CONTRACTS | {"models"},
    "stage": CONTRACTS | {"models", "runtime"},
    "report": CONTRACTS | {"models", "runtime"},
    "sources": CONTRACTS | {"models"},
    "training": CONTRACTS | {"models", "runtime", "stage"},
    "quantization": CONTRACTS | {"models", "runtime", "stage", "training"},
    "pruning": CONTRACTS | {"models", "runtime", "stage", "training"},
    "pipeline": CONTRACTS
    | {"models", "runtime", "stage", "report", "training", "pruning", "quantization"},
    "commands": CONTRACTS
    | {"models", "runtime", "stage", "report", "sources", "training", "pipeline"},
    "integrations": CONTRACTS | {"models", "runtime", "stage", "training", "pruning"},
    "cli": {"errors", "_io", "_version", "commands"},
    "__main__": {"cli"},
}
# Stages live in technique folders; a technique reaches another through `stage.py`.
TECHNIQUES = {"pruning", "quantization"}
STAGE_MODULES = {"compressor.training.distillation"}  # a stage inside a service folder


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every module's package-internal imports (module names), wherever they are written."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                if node.module:
                    found.add(f"{base}.{node.module}")
                else:  # from . import a, b: modules
                    found |= {f"{base}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module] if isinstance(node, ast.ImportFrom) else []
                names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
                found |= {n for n in names if n and n.split(".")[0] == "compressor"}
        graph[module] = found - {module}
    return graph


def _part(module: str) -> str:
    """The folder or top-level module a module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports()
    graph.pop("compressor")  # the package re-exports; no module imports it
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for name in sorted(graph.get(module, ())):
            if name in path:
                circles.append(" -> ".join([*path[path.index(name) :], name]))
            elif name in graph and len(path) < 40:
                visit(name, [*path, name])

    for module in sorted(graph):
        visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(sorted(set(circles))[:20])


def test_every_part_imports_only_the_layers_below_it():
    wrong = []
    for module, imported in _imports().items():
        part = _part(module)
        if part == "__init__":
            continue
        assert part in ALLOWED, f"{module}: add its folder to ALLOWED (and docs/architecture.md)"
        for name in imported:
            other = _part(name)
            if other != part and other not in ALLOWED[part]:
                wrong.append(f"{module} imports {name} ({part} may import: {ALLOWED[part]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_techniques_and_stages_never_import_each_other():
    stage_modules = set(STAGE_MODULES)
    for module in _imports():
        if _part(module) in TECHNIQUES:
            stage_modules.add(module)
    wrong = []
    for module, imported in _imports().items():
        if _part(module) not in TECHNIQUES | {"training"}:
            continue
        for name in imported & stage_modules:
            if _part(name) != _part(module) or name in STAGE_MODULES:
                wrong.append(f"{module} imports the technique module {name}")
    assert not wrong, "\n".join(sorted(wrong))


def _class_name_tests(tree: ast.AST) -> list[int]:
    """Lines that test a class by its name (``type(m).__name__ == ...``, `class_named`)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                if isinstance(side, ast.Attribute) and side.attr in ("__name__", "__qualname__"):
                    lines.append(node.lineno)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "class_named":
            lines.append(node.lineno)
    return lines


def test_model_specific_knowledge_lives_in_the_models_folder():
    found = defaultdict(list)
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "models" or path.name == "__init__.py":
            continue
        for line in _class_name_tests(ast.parse(path.read_text(encoding="utf-8"))):
            found[str(path.relative_to(PACKAGE))].append(line)
    assert not found, f"class names tested outside compressor/models: {dict(found)}"


def test_the_check_sees_a_class_name_test():
    tree = ast.parse("if type(m).__name__ == 'ResNet':\n    pass\nx = class_named('a.B')\n")
    assert _class_name_tests(tree) == [1, 3]


def test_every_folder_says_what_it_holds_and_may_import():
    for folder in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "May import" in doc, f"{folder.name}/__init__.py: docstring"
        assert folder.name in ALLOWED, folder.name


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_modules_stay_readable(path: Path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 620, path


def test_all_lists_exactly_what_the_package_exports():
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    exported = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert set(compressor.__all__) == exported
    assert len(compressor.__all__) == len(set(compressor.__all__))
    for name in compressor.__all__:
        assert getattr(compressor, name) is not None
