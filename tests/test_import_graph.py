"""lm_saes' modules import each other one way: no import cycle, counting imports inside functions (they run
too, only later) and not those under `if TYPE_CHECKING:` (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lm_saes"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imported(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """The dotted name each name of an import statement loads: `from a import b` loads a.b if that is a
    module, else (b is a name in a) a."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importer's package, up level - 1
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
    return [f"{base}.{alias.name}" for alias in node.names]


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    guards = [node for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)]
    type_checking = {id(n) for guard in guards for stmt in guard.body for n in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in type_checking:
            for dotted in _imported(node, name, path.name == "__init__.py"):
                while dotted and dotted not in modules:  # a name in a module: the module
                    dotted = dotted.rpartition(".")[0]
                if dotted and dotted != name:
                    found.add(dotted)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a path that comes back to its start), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            if (cycle := visit(nxt, [*path, node])) is not None:
                return cycle
        done.add(node)
        return None

    return next((c for start in sorted(graph) if (c := visit(start, [])) is not None), None)


def test_no_import_cycle_among_the_package_modules() -> None:
    modules = _module_names()
    graph = {name: _edges(name, path, modules) for name, path in modules.items()}
    assert "lm_saes.cli.verbs" in graph["lm_saes.cli.jobs"]  # the graph sees what it should
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])
