"""Imports point one way (DESIGN.md): no cycle among the modules of task/, client/, server/ and
serving/ (TYPE_CHECKING blocks and function-level imports included), serving imports nothing of
torch, flwr, task or server, and task nothing of flwr or server. Read with ast: no third-party
tool, no import side effects."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("task", "client", "server", "serving")
FORBIDDEN = {
    "serving": ("torch", "flwr", "task", "server"),
    "task": ("flwr", "server"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
    }


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, as a dotted name; ``from a import b``
    counts as ``a`` and as ``a.b`` (b may be a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's ``__init__`` is not followed into:
    importing ``a.b`` is an edge to ``a.b`` only, so a package re-exporting its modules is not a
    cycle with them)."""
    modules = project_modules()
    return {
        name: {m for m in imports_of(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_no_import_cycle_in_the_project() -> None:
    graph = import_graph()
    assert {"serving.dataplane", "server.strategy.state", "task.config", "client.app"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a_type_checking_import_is_an_edge(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from a.b import C\n"
    )
    assert "a.b" in imports_of(source)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_forbidden_imports(package: str) -> None:
    bad = sorted(
        (str(path.relative_to(ROOT)), module)
        for path in (ROOT / package).rglob("*.py")
        for module in imports_of(path)
        if module.split(".")[0] in FORBIDDEN[package]
    )
    assert not bad, f"{package}/ must not import {FORBIDDEN[package]}: {bad}"
