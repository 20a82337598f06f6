"""The layout says which process runs each piece of code; these are its import rules.

  corral.wire      both sides: imports no other room of corral
  corral.workers   the worker process: corral.workers and corral.wire only
  corral.client    client processes: corral.client and corral.wire only
  the arbiter      (corral.*, supervisor/) of corral.workers only corral.workers.spec, and
                   never wasmtime: guest checks run in a child (corral.workers.check)

Checked on the source (every import statement, at any depth), not on a
running interpreter, so that an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOMS = {  # room -> (folder, rooms it may import)
    "corral.wire": (REPO / "supervisor" / "wire", {"corral.wire"}),
    "corral.workers": (REPO / "workers", {"corral.workers", "corral.wire"}),
    "corral.client": (REPO / "supervisor" / "client", {"corral.client", "corral.wire"}),
}


def corral_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            pytest.fail(f"{path}:{node.lineno}: relative import; name the room (from corral.x import y)")
    return [(line, name) for line, name in found if name == "corral" or name.startswith("corral.")]


def room_of(name: str) -> str:
    for room in ROOMS:
        if name == room or name.startswith(room + "."):
            return room
    return "corral"  # the arbiter's own modules (corral.daemon, corral.config, ...)


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_each_room_imports_only_what_its_process_may(room):
    folder, allowed = ROOMS[room]
    sources = sorted(folder.glob("*.py"))
    assert sources, f"{folder} is empty"
    wrong = [f"{path.relative_to(REPO)}:{line}: imports {name} ({room_of(name)})"
             for path in sources for line, name in corral_imports(path)
             if room_of(name) not in allowed]
    assert not wrong, "\n".join(wrong)


def test_the_rule_catches_a_worker_importing_the_arbiter(tmp_path):
    """The check itself: an arbiter import in worker code is found."""
    planted = tmp_path / "bad.py"
    planted.write_text("def f():\n    from corral.broker import Broker\n")
    assert [room_of(name) for _, name in corral_imports(planted)] == ["corral"]


# The spec: what the daemon writes for its children. The state store: SQLite
# only, no wasmtime (checked below); the daemon checks state files at start-up
# and the operator's `corral state` verbs read them. state_pg: the same on PostgreSQL
# (psycopg and state, no wasmtime; docs/cluster.md).
# And what the kernel offers for confinement (docs/confinement.md): ctypes and libseccomp only.
ARBITER_MAY_IMPORT_OF_WORKERS = {"corral.workers.spec", "corral.workers.state", "corral.workers.state_pg",
                                 "corral.workers.confine"}


def test_the_arbiter_imports_nothing_of_the_worker_but_its_spec():
    """Guest code (and wasmtime) never runs in the arbiter: the module checks are a child's."""
    sources = sorted((REPO / "supervisor").glob("*.py"))
    assert sources
    wrong = [f"{path.relative_to(REPO)}:{line}: imports {name}"
             for path in sources for line, name in corral_imports(path)
             if room_of(name) == "corral.workers" and not any(
                 name == allowed or name.startswith(allowed + ".") for allowed in ARBITER_MAY_IMPORT_OF_WORKERS)]
    assert not wrong, "\n".join(wrong)
    wasmtime = [f"{path.relative_to(REPO)}:{node.lineno}" for path in sources
                for node in ast.walk(ast.parse(path.read_text(), str(path)))
                if isinstance(node, (ast.Import, ast.ImportFrom))
                and any((alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[0] == "wasmtime"
                        for alias in node.names)]
    assert not wasmtime, "the arbiter imports wasmtime: " + ", ".join(wasmtime)
    for allowed in ARBITER_MAY_IMPORT_OF_WORKERS:
        source = REPO / "workers" / (allowed.rsplit(".", 1)[1] + ".py")
        imported = [name for _, name in corral_imports(source)] + [
            alias.name for node in ast.walk(ast.parse(source.read_text()))
            if isinstance(node, ast.Import) for alias in node.names]
        assert not [name for name in imported if name.split(".")[0] == "wasmtime"
                    or room_of(name) == "corral.workers" and not any(
                        name == a or name.startswith(a + ".") for a in ARBITER_MAY_IMPORT_OF_WORKERS)], \
            f"{source} imports {imported}"


def arbiter_imports(folder: Path) -> dict[str, set[str]]:
    """corral.X -> the arbiter modules it imports (anywhere: in functions, under TYPE_CHECKING)."""
    modules = {f"corral.{path.stem}": path for path in folder.glob("*.py") if path.stem != "__init__"}
    graph = {}
    for module, path in modules.items():
        graph[module] = {next(m for m in sorted(modules, key=len, reverse=True) if name == m or name.startswith(m + "."))
                         for _, name in corral_imports(path)
                         if any(name == m or name.startswith(m + ".") for m in modules)} - {module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each once (as the path from its first module round to it)."""
    found, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            circle = path[path.index(module):]
            if frozenset(circle) not in done:
                done.add(frozenset(circle))
                found.append(circle + [module])
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, path + [module])

    for module in sorted(graph):
        visit(module, [])
    return found


def test_the_arbiters_modules_import_no_circle():
    """A circle means no module of it can be read, or tested, without the others: the
    satellites (control, verbs, metrics, snapshot) get narrow interfaces instead of the daemon."""
    found = circles(arbiter_imports(REPO / "supervisor"))
    assert not found, "\n".join(" -> ".join(circle) for circle in found)


def test_only_the_cli_imports_the_daemon():
    graph = arbiter_imports(REPO / "supervisor")
    assert sorted(m for m, imported in graph.items() if "corral.daemon" in imported) == ["corral.cli"]


def test_the_circle_rule_finds_a_circle(tmp_path):
    """The check itself: two modules that import each other, one only under TYPE_CHECKING."""
    (tmp_path / "a.py").write_text("from corral.b import B\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from corral import a\n")
    assert circles(arbiter_imports(tmp_path)) == [["corral.a", "corral.b", "corral.a"]]
