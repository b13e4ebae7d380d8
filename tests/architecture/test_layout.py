"""The package's shape, enforced: no import cycles, no SQL outside ``registry/``, an explicit command catalog.

Imports are read from the source (``ast``), lazy ones inside functions included: a cycle through a function-level
import is still two modules that cannot be understood apart. ``if TYPE_CHECKING:`` imports are not edges.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "llmops_jupyter"
#: SQL as this code base writes it: upper-case keywords (so prose such as "drop examples" is not SQL).
SQL = re.compile(r"^\s*(SELECT\s|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+(TABLE|INDEX)|ALTER\s+TABLE|PRAGMA\s|DROP\s+(TABLE|INDEX))")
DB_CALLS = {"query", "transaction", "executemany", "executescript", "_query", "_transaction"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        if "labextension" in p.parts:
            continue
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def import_graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps: set[str] = set()

        def visit(node: ast.AST, mod: str = mod, deps: set[str] = deps) -> None:
            for child in ast.iter_child_nodes(node):
                if _is_type_checking(child):
                    continue
                names: list[str] = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                    # `from pkg import submodule` depends on the submodule (a package's __init__ is implied by
                    # every import below it, so it is not an edge of its own); `from mod import name` on mod.
                    subs = [f"{child.module}.{a.name}" for a in child.names if f"{child.module}.{a.name}" in mods]
                    names = subs if len(subs) == len(child.names) else [child.module, *subs]
                for name in names:
                    target = resolve(name) if name.startswith("llmops_jupyter") else None
                    if target and target != mod:
                        deps.add(target)
                visit(child)

        visit(ast.parse(path.read_text()))
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_cycle_detector_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" ↔ ".join(c) for c in found)


def test_core_imports_nothing_above_it():
    allowed = ("llmops_jupyter.core", "llmops_jupyter.registry")
    graph = import_graph()
    bad = {m: sorted(d for d in deps if not d.startswith(allowed))
           for m, deps in graph.items() if m.startswith("llmops_jupyter.core")}
    assert not {m: d for m, d in bad.items() if d}, bad
    reg = {m: sorted(d for d in deps if not d.startswith(allowed))
           for m, deps in graph.items() if m.startswith("llmops_jupyter.registry")}
    assert not {m: d for m, d in reg.items() if d}, reg


def sql_outside_registry() -> list[str]:
    hits = []
    for mod, path in _modules().items():
        if mod.startswith("llmops_jupyter.registry"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            where = f"{path.relative_to(PKG.parent)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value):
                hits.append(f"{where} SQL string {node.value.strip()[:40]!r}")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if "sqlite3" in names:
                    hits.append(f"{where} imports sqlite3")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in DB_CALLS:
                    hits.append(f"{where} .{node.func.attr}()")
                elif node.func.attr == "execute" and node.args and isinstance(node.args[0], ast.Constant):
                    hits.append(f"{where} .execute('...')")
    return hits


def test_no_sql_outside_registry():
    hits = sql_outside_registry()
    assert not hits, f"{len(hits)} database calls outside registry/:\n" + "\n".join(hits)


def test_sql_detector_sees_sql(tmp_path, monkeypatch):
    bad = PKG / "_sql_probe_for_test.py"
    bad.write_text("def f(reg):\n    return reg.query('SELECT 1')\n")
    try:
        assert any("_sql_probe_for_test" in h for h in sql_outside_registry())
    finally:
        bad.unlink()


def test_catalog_is_explicit_and_complete():
    """Every module that registers a command is listed in the catalog, and the catalog lists nothing else."""
    from llmops_jupyter.core import stage

    registering = sorted(
        mod for mod, path in _modules().items()
        if re.search(r"^@(register_stage|command\()", path.read_text(), re.M)
    )
    assert sorted(stage.CATALOG) == registering


@pytest.mark.parametrize("pkg", ["data", "finetune", "eval", "merge", "quantize", "serve", "monitor", "adapt",
                                 "report"])
def test_one_package_per_stage(pkg):
    assert (PKG / "stages" / pkg / "__init__.py").exists()
    assert (PKG / "stages" / pkg / "stage.py").exists() or pkg == "adapt"
