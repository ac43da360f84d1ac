"""The import graph of the ``service`` package, read from source with ``ast`` (nothing imported).

Every ``import`` statement counts, wherever it is: at module level, inside a function (a lazy
import still runs) or under ``TYPE_CHECKING``. An import of ``a.b`` names the module ``a.b`` when
it exists, else the package that defines the name.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "service"


@dataclass
class ImportGraph:
    internal: dict[str, set[str]] = field(default_factory=dict)
    """module -> the modules of the package it imports."""
    external: dict[str, set[str]] = field(default_factory=dict)
    """module -> the top-level names of the other packages it imports (``fastapi``, ``os``)."""

    def reachable(self, module: str) -> set[str]:
        """The module and every module of the package it imports, directly or not."""
        seen = {module}
        stack = [module]
        while stack:
            for target in self.internal[stack.pop()]:
                if target not in seen:
                    seen.add(target)
                    stack.append(target)
        return seen

    def path(self, start: str, goal: str) -> list[str]:
        """One import chain from ``start`` to ``goal`` (for a readable failure)."""
        came_from: dict[str, str | None] = {start: None}
        queue = [start]
        while queue:
            current = queue.pop(0)
            if current == goal:
                chain = [current]
                while (previous := came_from[chain[-1]]) is not None:
                    chain.append(previous)
                return chain[::-1]
            for target in sorted(self.internal[current]):
                if target not in came_from:
                    came_from[target] = current
                    queue.append(target)
        return []

    def cycles(self) -> list[list[str]]:
        """Strongly connected components of more than one module (Tarjan), each sorted."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        on_stack: set[str] = set()
        stack: list[str] = []
        found: list[list[str]] = []

        def visit(node: str) -> None:
            index[node] = low[node] = len(index)
            stack.append(node)
            on_stack.add(node)
            for target in self.internal[node]:
                if target not in index:
                    visit(target)
                    low[node] = min(low[node], low[target])
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in self.internal[node]:
                    found.append(sorted(component))

        for node in sorted(self.internal):
            if node not in index:
                visit(node)
        return found


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def build(root: Path = ROOT, package: str = PACKAGE) -> ImportGraph:
    files = {
        module_name(path, root): path
        for path in sorted((root / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    }
    graph = ImportGraph()
    for module, path in files.items():
        internal: set[str] = set()
        external: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, module, is_package)
                # ``from a import b`` imports the module a.b when there is one, else a name of a.
                names = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    for alias in node.names
                ]
            for name in names:
                if name == package or name.startswith(package + "."):
                    internal.add(_nearest_module(name, files))
                else:
                    external.add(name.split(".")[0])
        internal.discard(module)
        graph.internal[module] = internal
        graph.external[module] = external
    return graph


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    if not is_package:
        parts.pop()
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, node.module] if node.module else parts)


def _nearest_module(name: str, files: dict[str, Path]) -> str:
    while name not in files and "." in name:
        name = name.rsplit(".", 1)[0]
    return name
