"""serving/'s imports point one way: no cycle between its modules (TYPE_CHECKING blocks and
function-level imports included), and nothing of torch, flwr, task or server."""

from __future__ import annotations

import ast
from pathlib import Path

SERVING = Path(__file__).resolve().parent.parent / "serving"
FORBIDDEN = ("torch", "flwr", "task", "server")


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, as a dotted name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "serving":  # from serving import x: x may be a module
                found |= {f"serving.{alias.name}" for alias in node.names}
    return found


def serving_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in SERVING.glob("*.py")}
    return {
        p.stem: {m.split(".")[1] for m in imports_of(p) if m.startswith("serving.")} & modules
        for p in SERVING.glob("*.py")
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
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


def test_no_import_cycle_in_serving() -> None:
    graph = serving_graph()
    assert {"dataplane", "api", "protocol", "errors"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_serving_imports_no_torch_flwr_task_or_server() -> None:
    bad = {
        (path.name, module)
        for path in SERVING.glob("*.py")
        for module in imports_of(path)
        if module.split(".")[0] in FORBIDDEN
    }
    assert not bad
