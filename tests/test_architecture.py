"""The package's import graph: no cycles, and the library never imports a stage, the experiment or the
command line.

Every import counts, also those inside functions and under ``TYPE_CHECKING``: a lazy import hides a
cycle from the interpreter, not from the reader who has to understand both modules at once.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "src" / "quality_gate"
# Modules allowed to import the stages, the experiment and the CLI: those entry points themselves.
ENTRY_POINTS = (
    "quality_gate.cli",
    "quality_gate.__main__",
    "quality_gate.stages",
    "quality_gate.experiment",
    "quality_gate.benchmarks",
)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` for every ``.py`` under ``root`` (a package dir).

    ``from pkg import name`` points at the submodule ``pkg.name`` when there is one, else at ``pkg``;
    an import of ``pkg.sub`` points at ``pkg.sub`` alone (not at ``pkg/__init__``).
    """
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                wanted = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                wanted = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in wanted:
                while target and target not in files:  # `import pkg.mod.attr` -> pkg.mod
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_the_package():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40  # the whole package was read
    assert cycles(graph) == []


def test_the_library_never_imports_a_stage_the_experiment_or_the_cli():
    graph = import_graph(PACKAGE)
    wrong = {
        module: sorted(t for t in targets if t.startswith(ENTRY_POINTS))
        for module, targets in graph.items()
        if not module.startswith(ENTRY_POINTS)
    }
    assert {m: t for m, t in wrong.items() if t} == {}
    importers_of_cli = sorted(m for m, targets in graph.items() if "quality_gate.cli" in targets)
    assert importers_of_cli == ["quality_gate.__main__"]


def test_only_the_command_line_knows_the_seeds_names():
    """The seed's aliases (compat.py) are read at the edge alone: the command line maps them to the current
    names before anything is validated, so the core never imports them."""
    graph = import_graph(PACKAGE)
    assert "quality_gate.compat" in graph  # the module is still there, and was read
    importers = sorted(m for m, targets in graph.items() if "quality_gate.compat" in targets)
    assert importers == ["quality_gate.cli"]


def test_the_checks_find_a_cycle_and_a_lazy_one(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.b import B\n")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")  # relative and lazy
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.d\n")
    (pkg / "d.py").write_text("import pkg.c\n")
    (pkg / "e.py").write_text("import pkg.a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub"] == {"pkg.sub.b"}
    assert sorted(cycles(graph)) == [["pkg.a", "pkg.sub.b"], ["pkg.c", "pkg.d"]]
