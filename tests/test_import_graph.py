"""The project's import graph: no cycle between modules, and no package imports a higher one.

Every import counts, the ones inside functions too (a local import hides a cycle, it does not
remove it); only ``if TYPE_CHECKING:`` blocks are left out, as they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Lowest first, as docs/architecture.md orders them: a package may import only the ones before it.
PACKAGES = ("outcome", "polling", "host_stack", "qmp_helpers", "guests", "images", "gmemtest")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _runtime_nodes(tree: ast.Module) -> list[ast.AST]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return [n for n in ast.walk(tree) if id(n) not in skip]


def _imports(path: Path, modules: set[str]) -> set[str]:
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        for imported in names:
            name = imported
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module(p) for p in files}
    return {_module(p): _imports(p, modules) for p in files}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules() -> None:
    graph = _graph()
    # A package's __init__ that re-exports its modules imports them: that edge is not a cycle of design.
    graph = {m: {d for d in deps if not (m.count(".") == 0 and d.startswith(m + "."))} for m, deps in graph.items()}
    assert _cycles(graph) == []


def test_no_package_imports_a_higher_one() -> None:
    rank = {pkg: i for i, pkg in enumerate(PACKAGES)}
    wrong = sorted(f"{m} imports {d}" for m, deps in _graph().items() for d in deps
                   if rank[d.split(".")[0]] > rank[m.split(".")[0]])
    assert wrong == []


def test_the_graph_sees_local_imports() -> None:
    """The walker itself: a function-local import is an edge (cli imports the runner only locally)."""
    assert "gmemtest.runner" in _graph()["gmemtest.cli"]
