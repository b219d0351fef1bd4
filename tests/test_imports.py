"""Import structure of the rlhf package, read from the source with ast (nothing imported):
no import cycle, and no training algorithm module imports another (shared services live
in rlhf.scoring, rlhf.encoders, rlhf.training, rlhf.generate)."""

from __future__ import annotations

import ast
from pathlib import Path

from rlhf.runner import KIND_MODULES

PACKAGE = Path(__file__).resolve().parent.parent / "rlhf"


def imports_of(path: Path) -> set[str]:
    """Every rlhf module a file imports, at top level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("rlhf."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "rlhf":
                found.update(f"rlhf.{a.name}" for a in node.names)
            elif node.module.startswith("rlhf."):
                found.add(node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    return {f"rlhf.{path.stem}": imports_of(path) for path in PACKAGE.glob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_rlhf_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert imports_of(PACKAGE / "pool.py") >= {"rlhf.scoring", "rlhf.generate"}


def test_no_algorithm_module_imports_another():
    algorithms = set(KIND_MODULES.values())
    graph = import_graph()
    crossing = {module: sorted(graph[module] & (algorithms - {module})) for module in algorithms}
    assert {m: targets for m, targets in crossing.items() if targets} == {}
