"""The package's import structure: no import cycles, and the layers only import downwards.

The graph is read from the source (``ast``), not from ``sys.modules``, so it holds every import
statement of every module of ``src/segadapt``: those at the top, those inside functions (which
only defer a cycle to the first call) and those under ``if TYPE_CHECKING:`` (kept apart: they
never run, so they cannot close a cycle, but a lower layer naming an upper layer's type still
depends on it). An edge goes to the module an import names: ``from .x import y`` to ``x``, or to
``x.y`` when ``y`` is a submodule. Importing a submodule also runs its package's ``__init__``, but
that implicit edge is not counted: it would make every package with re-exports a cycle.

Layers, bottom to top:

- bottom modules (``errors``, ``config``, ``progress``, ``collectives``);
- ``data``, ``models``, ``metrics``, ``methods``: the library, usable without the training engine;
- ``viz``: figures, above the library and below the engine;
- ``engine``, ``commands``, ``cli``: the application.

Usage as a script, to print the graph's cycles and layer violations: ``python tests/test_architecture.py``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Iterable, NamedTuple

PACKAGE = "segadapt"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE

BOTTOM = ("errors", "config", "progress", "collectives")
LIBRARY = ("data", "models", "metrics", "methods")
APPLICATION = ("engine", "commands", "cli", "viz")


class Edge(NamedTuple):
    """``source`` imports ``target`` (module names) on ``line``; ``type_only`` under ``if TYPE_CHECKING:``."""

    source: str
    target: str
    line: int
    type_only: bool

    def __str__(self) -> str:
        return f"{self.source} -> {self.target}"


def module_names(root: Path = SOURCE, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its ``__init__.py``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers of the bodies of ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``) blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for child in node.body:
                    lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` or its longest prefix that is a module of the package (``pkg.mod.attr`` -> ``pkg.mod``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_edges(modules: dict[str, Path] | None = None, package_name: str = PACKAGE) -> list[Edge]:
    """Every import of a package module by a package module, wherever it stands in the file.

    One edge per (importer, imported, type-only), at the first line that imports it.
    """
    modules = module_names() if modules is None else modules
    first: dict[tuple[str, str, bool], int] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        type_only = _type_checking_lines(tree)
        # relative imports count from the module's package: the module itself for an __init__
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join([*base, node.module] if node.module else base)
                else:
                    origin = node.module or ""
                # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
                targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                           for alias in node.names]
            for target in targets:
                resolved = _known(target, modules) if target.split(".")[0] == package_name else None
                if resolved is not None and resolved != name:
                    key = (name, resolved, node.lineno in type_only)
                    first[key] = min(first.get(key, node.lineno), node.lineno)
    return sorted(Edge(source, target, line, type_only) for (source, target, type_only), line in first.items())


def cycles(edges: Iterable[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted, sorted."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def cycle_edges(edges: Iterable[Edge]) -> list[Edge]:
    """The edges that close cycles: both ends in the same strongly connected component."""
    edges = list(edges)
    member = {module: i for i, component in enumerate(cycles(edges)) for module in component}
    return [e for e in edges if e.source in member and member[e.source] == member.get(e.target)]


def _in(module: str, parts: Iterable[str]) -> bool:
    """Whether ``module`` is ``segadapt.P`` or below it for one of ``parts``."""
    return any(module == f"{PACKAGE}.{p}" or module.startswith(f"{PACKAGE}.{p}.") for p in parts)


def layer_violations(edges: Iterable[Edge]) -> list[Edge]:
    """Imports that go up: bottom modules and the library importing the application, viz importing the engine."""
    bad = []
    for edge in edges:
        if _in(edge.source, BOTTOM + LIBRARY) and _in(edge.target, APPLICATION):
            bad.append(edge)
        elif _in(edge.source, ("viz",)) and _in(edge.target, ("engine", "commands", "cli")):
            bad.append(edge)
    return bad


EDGES = import_edges()
RUNTIME_EDGES = [e for e in EDGES if not e.type_only]


def _listing(edges: Iterable[Edge]) -> str:
    return "\n".join(f"  {e} (line {e.line}{', TYPE_CHECKING' if e.type_only else ''})" for e in edges)


# ---- the graph reader itself ---------------------------------------------------------------------


def test_the_graph_reader_resolves_relative_function_level_and_submodule_imports(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("from .a import f\n")
    (root / "a.py").write_text("def f():\n    from .sub import b\n    from . import sub\n")
    (root / "sub" / "__init__.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import f\n")
    (root / "sub" / "b.py").write_text("import pkg.a\nfrom pkg import a\nfrom .. import f\nimport os\n")
    edges = import_edges(module_names(root, "pkg"), "pkg")
    assert [(e.source, e.target, e.type_only) for e in edges] == [
        ("pkg", "pkg.a", False),
        ("pkg.a", "pkg.sub", False),
        ("pkg.a", "pkg.sub.b", False),
        ("pkg.sub", "pkg.a", True),
        ("pkg.sub.b", "pkg", False),
        ("pkg.sub.b", "pkg.a", False),
    ]
    assert cycles(edges) == [["pkg", "pkg.a", "pkg.sub", "pkg.sub.b"]]
    assert cycles([e for e in edges if not e.type_only]) == [["pkg", "pkg.a", "pkg.sub.b"]]


def test_the_package_has_the_modules_the_rules_name() -> None:
    modules = module_names()
    for part in BOTTOM + LIBRARY + APPLICATION:  # engine has no __init__: a namespace package
        assert any(_in(module, (part,)) for module in modules), part
    assert f"{PACKAGE}.data.transforms" in modules and f"{PACKAGE}.data.benchmark" in modules


# ---- the rules -----------------------------------------------------------------------------------


def test_no_import_cycles() -> None:
    found = cycle_edges(RUNTIME_EDGES)
    assert not found, f"import cycles {cycles(RUNTIME_EDGES)} through:\n{_listing(found)}"


def test_bottom_modules_and_the_library_never_import_the_application() -> None:
    found = [e for e in layer_violations(EDGES) if _in(e.source, BOTTOM + LIBRARY)]
    assert not found, f"imports of engine, commands, cli or viz from below them:\n{_listing(found)}"


def test_viz_never_imports_the_engine() -> None:
    found = [e for e in layer_violations(EDGES) if _in(e.source, ("viz",))]
    assert not found, f"segadapt.viz imports the engine, a command or the cli:\n{_listing(found)}"


def main() -> int:
    print(f"{len(module_names())} modules, {len(EDGES)} import edges ({len(EDGES) - len(RUNTIME_EDGES)} TYPE_CHECKING)")
    found = cycles(RUNTIME_EDGES)
    print(f"\n{len(found)} import cycle(s):")
    for component in found:
        print("  {" + ", ".join(component) + "}")
        print(_listing(e for e in cycle_edges(RUNTIME_EDGES) if e.source in component))
    type_cycles = [c for c in cycles(EDGES) if c not in found]
    if type_cycles:
        print(f"\n{len(type_cycles)} more cycle(s) counting TYPE_CHECKING imports: {type_cycles}")
    violations = layer_violations(EDGES)
    print(f"\n{len(violations)} layer violation(s):")
    print(_listing(violations))
    return 1 if found or violations else 0


if __name__ == "__main__":
    sys.exit(main())
