"""The router's layout rules, checked on the source: no import cycle between its modules (late
and type-checking imports included), aiohttp only in `router/http/`, the generated `pb` stubs
only in the shard client, and no function-level imports left to dodge a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROUTER = Path(__file__).resolve().parents[2] / "router"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROUTER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, ast.AST]]:
    """Every imported module name with its node, wherever the import statement is."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node))
            out += [(f"{node.module}.{alias.name}", node) for alias in node.names]
    return out


MODULES = {module_name(p): p for p in ROUTER.rglob("*.py")}


def graph() -> dict[str, set[str]]:
    return {
        name: {m for m, _ in imports(path) if m in MODULES and m != name}
        for name, path in MODULES.items()
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_router_has_no_import_cycle():
    edges = graph()
    # package __init__ modules are imported implicitly by their children: not an edge here
    assert find_cycle(edges) is None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_http_package_imports_aiohttp():
    users = {n for n, p in MODULES.items() if any(m.startswith("aiohttp") for m, _ in imports(p))}
    assert users and all(n.startswith("router.http") for n in users), sorted(users)


def test_only_the_shard_client_imports_the_protobuf_stubs():
    users = {n for n, p in MODULES.items() if any(m.split(".")[0] == "pb" for m, _ in imports(p))}
    assert users == {"router.batching.shard_client"}


def test_no_import_inside_a_function():
    late = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(func):
                    if isinstance(node, ast.Import | ast.ImportFrom):
                        late.append(f"{name}:{node.lineno}")
    assert not late
