"""The module graph keeps the architecture's promises (docs/architecture.md).

Imports are read with `ast` from main.py, config/ and src/, at any depth (function-level imports count: they
pull the imported module in just the same), and resolved to the project's own modules. Three rules:

- the two workers never import each other: shared names live in modules both import;
- `config` imports nothing from `src` except `src.errors`;
- no import cycles among the project's modules, nor among its packages (`config` -> `src.utils` -> `config`
  is a cycle between two homes even when no single module imports itself back).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ("src.mechanism_x", "src.mechanism_y")
CONFIG_MAY_IMPORT_FROM_SRC = {"src.errors"}


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer} imports {self.imported} ({module_path(self.importer)}:{self.line})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_path(name: str) -> str:
    base = ROOT / Path(*name.split("."))
    return (base / "__init__.py" if base.is_dir() else base.with_suffix(".py")).relative_to(ROOT).as_posix()


def project_modules() -> dict[str, Path]:
    files = [ROOT / "main.py", *sorted((ROOT / "config").rglob("*.py")), *sorted((ROOT / "src").rglob("*.py"))]
    return {module_name(f): f for f in files}


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The project module an import of `target` loads: its longest prefix that is a project module."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _targets(node: ast.AST, importer: str, is_package: bool) -> list[str]:
    """Dotted names an import statement may load (for `from a import b`, both `a.b` and `a`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names]


def import_edges(modules: dict[str, Path] | None = None) -> list[Edge]:
    """Every (importer, imported project module, line), once, sorted."""
    modules = modules or project_modules()
    edges: set[Edge] = set()
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(node, name, path.name == "__init__.py"):
                resolved = _resolve(target, modules)
                if resolved and resolved != name:
                    edges.add(Edge(name, resolved, node.lineno))
    return sorted(edges, key=lambda e: (e.importer, e.line, e.imported))


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle (a -> b -> ... -> a) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the project graph is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, c) for c in sorted(components, key=min)]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """The shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, set()) & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def _graph(edges: list[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.importer, set()).add(e.imported)
    return graph


def package_of(module: str) -> str:
    """The home a module belongs to: `config`, a subpackage of `src` (`src.utils`, `src.mechanism_x`, ...), or,
    for `main` and the modules directly in `src/` (`src.errors`, ...), the module itself."""
    parts = module.split(".")
    if parts[0] == "config":
        return "config"
    if parts[0] == "src" and len(parts) >= 3:
        return ".".join(parts[:2])
    return module


def _describe(cycles: list[list[str]], lines: dict[tuple[str, str], str]) -> str:
    return " | ".join(
        " -> ".join(f"{a} ({lines[a, b]})" for a, b in zip(c, c[1:], strict=False)) + f" -> {c[-1]}" for c in cycles
    )


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# ----------------------------------------------------------------------------- the rules


def test_workers_never_import_each_other():
    crossing = [
        str(e) for e in import_edges() for a, b in (WORKERS, WORKERS[::-1]) if _in(e.importer, a) and _in(e.imported, b)
    ]
    assert not crossing, (
        "a worker imports the other one (move the shared name to src/schemas, src/utils or a module both import): "
        + "; ".join(crossing)
    )


def test_config_imports_nothing_from_src_but_errors():
    bad = [
        str(e)
        for e in import_edges()
        if _in(e.importer, "config") and _in(e.imported, "src") and e.imported not in CONFIG_MAY_IMPORT_FROM_SRC
    ]
    assert not bad, "config may import only src.errors from src: " + "; ".join(bad)


def test_no_import_cycles_among_project_modules():
    edges = import_edges()
    cycles = find_cycles(_graph(edges))
    lines = {(e.importer, e.imported): f"{module_path(e.importer)}:{e.line}" for e in edges}
    assert not cycles, f"{len(cycles)} import cycle(s) between modules: {_describe(cycles, lines)}"


def test_no_import_cycles_among_project_packages():
    edges = [
        Edge(package_of(e.importer), package_of(e.imported), e.line)
        for e in import_edges()
        if package_of(e.importer) != package_of(e.imported)
    ]
    cycles = find_cycles(_graph(edges))
    first = {}
    for e in import_edges():  # name the first import that makes each package edge, to point at a line
        first.setdefault((package_of(e.importer), package_of(e.imported)), f"{module_path(e.importer)}:{e.line}")
    assert not cycles, f"{len(cycles)} import cycle(s) between packages: {_describe(cycles, first)}"


# ----------------------------------------------------------------------------- the reader itself


def test_the_reader_sees_module_and_function_level_imports():
    edges = {(e.importer, e.imported) for e in import_edges()}
    assert ("main", "config.config") in edges  # `from config.config import Settings` at module level
    # run_worker imports make_source inside the function body
    assert ("src.mechanism_x.data_ingestion", "src.mechanism_x.file_monitor") in edges
    assert len(project_modules()) > 20


def test_relative_and_package_imports_resolve(tmp_path):
    modules = {
        "pkg": tmp_path / "pkg/__init__.py",
        "pkg.a": tmp_path / "pkg/a.py",
        "pkg.b": tmp_path / "pkg/b.py",
        "pkg.sub.c": tmp_path / "pkg/sub/c.py",
    }
    for path in modules.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    modules["pkg"].write_text("from . import a\n")
    modules["pkg.a"].write_text("def f():\n    from .b import thing\n")
    modules["pkg.b"].write_text("import os\nfrom pkg.sub.c import x\n")
    modules["pkg.sub.c"].write_text("from .. import a\nfrom ..b import y\n")
    got = {(e.importer, e.imported) for e in import_edges(modules)}
    assert got == {("pkg", "pkg.a"), ("pkg.a", "pkg.b"), ("pkg.b", "pkg.sub.c"), ("pkg.sub.c", "pkg.a"),
                   ("pkg.sub.c", "pkg.b")}  # fmt: skip


def test_cycles_are_found_with_their_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "x": {"y"}, "y": {"x"}, "z": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["x", "y", "x"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
