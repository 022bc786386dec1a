"""The package's shape: modules import each other without a cycle, storage never the job."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "segclr_beam"
# Modules that read or write stored data; they know nothing of jobs and their composition.
STORAGE = {"records", "shards", "precomputed", "points", "outputs", "manifest", "reader",
           "annotations"}
COMPOSITION = {"job", "pipeline", "reprocess", "cli"}
PREFIX = "segclr_beam."


def imports() -> dict[str, set[str]]:
    """Each module of the package -> the package modules it imports, anywhere in its code."""
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in modules:
        found = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "segclr_beam":
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PREFIX):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names
                          if a.name.startswith(PREFIX)}
        graph[name] = found & modules
    return graph


def test_no_import_cycle():
    graph = imports()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for other in sorted(graph[module]):
            assert state.get(other) != "open", "import cycle: " + " -> ".join(path + [other])
            if other not in state:
                visit(other, path + [other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_storage_modules_do_not_import_the_job():
    graph = imports()
    assert STORAGE <= set(graph)
    for module in STORAGE:
        assert not graph[module] & COMPOSITION, (module, graph[module] & COMPOSITION)
