"""The import graph of our two packages: ``p2pdiff`` may import ``signaling``, never the reverse, and
neither has a cycle. Imports are read from the source (``ast``), at module level and inside functions,
so a lazy import that only hides a loop at run time is a loop here too, and so are imports under
``if TYPE_CHECKING:``: a loop of types is still a loop a reader has to untangle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("p2pdiff", "signaling")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imported(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of ours that import statements under ``node`` name, wherever they stand.
    ``from pkg import name`` loads ``pkg.name`` when that is a module, else ``pkg`` itself. The
    ``__init__`` of an enclosing package is not counted: Python imports a submodule of a package that
    is still initialising without running the package again, so that is no loop."""
    found: set[str] = set()
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            found |= {alias.name for alias in child.names}
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (child.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in child.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        found |= _imported(child, module, is_package, modules)
    return {m for m in found if m in modules and m != module}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: _imported(
            ast.parse(path.read_text(), filename=str(path)), name, path.name == "__init__.py", set(modules)
        )
        for name, path in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_graph_sees_the_packages() -> None:
    graph = import_graph()
    assert "p2pdiff.app" in graph and "signaling.session" in graph
    assert any(dep.startswith("signaling") for dep in graph["p2pdiff.rooms.helper"])


def test_signaling_never_imports_p2pdiff() -> None:
    graph = import_graph()
    offending = {m: sorted(d for d in deps if d.startswith("p2pdiff")) for m, deps in graph.items()}
    assert {m: d for m, d in offending.items() if m.startswith("signaling") and d} == {}


def test_no_import_cycles() -> None:
    assert _cycles(import_graph()) == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_cycle_finder(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert _cycles(graph) == expected


def test_lazy_and_type_only_imports_count(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from p2pdiff import x\n"
        "def f():\n    from p2pdiff.rooms import helper\n"
    )
    known = {"p2pdiff", "p2pdiff.x", "p2pdiff.rooms", "p2pdiff.rooms.helper", "p2pdiff.tasks.results"}
    names = _imported(ast.parse(source), "p2pdiff.tasks.results", False, known)
    assert "p2pdiff.rooms.helper" in names  # a lazy import counts
    assert "p2pdiff.x" in names  # and so does a type-only one


# p2pdiff's layers, lowest first: a module may import its own layer and the layers before it (and the
# package's top-level modules below app.py: config, errors, appkeys), never one after it.
LAYERS = ("tasks", "rooms", "ops", "rest")


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "p2pdiff" and len(parts) > 2 and parts[1] in LAYERS else None


def test_layers_import_downwards_only() -> None:
    upward = sorted(
        f"{module} -> {dep}"
        for module, deps in import_graph().items()
        for dep in deps
        if (low := _layer(module)) and (high := _layer(dep)) and LAYERS.index(high) > LAYERS.index(low)
    )
    assert upward == []
