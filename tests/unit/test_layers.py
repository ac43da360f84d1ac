"""The package's layering, checked on its import graph (read from source, tests/importgraph.py).

Dependencies point inwards: the HTTP layer (app, routers, request dependencies, middleware,
problem+json) may use the web framework; nothing below it does, not even through another module.
A new module is below the HTTP layer unless it is added here on purpose.
"""

from __future__ import annotations

from fnmatch import fnmatch

import importgraph
import pytest

WEB_FRAMEWORKS = {"fastapi", "starlette"}

HTTP_LAYER = (
    "service.app",
    "service.health",
    "service.http",
    "service.http.*",
    "service.middleware",
    "service.middleware.*",
    "service.observability.request_id",
    "service.security.dependencies",
    "service.tasks.router",
    "service.tasks.http",
    "service.tasks.parameters",
    # Entry points start the app; nothing in the library imports them.
    "service.__main__",
    "service.entrypoints",
    "service.entrypoints.*",
)

# Named by the layering rule: if one of these is renamed, say where it went.
BELOW_HTTP = (
    "service.db",
    "service.errors",
    "service.settings",
    "service.migrate",
    "service.migrations.env",
    "service.state",
    "service.tasks.service",
    "service.tasks.repository",
    "service.tasks.sorting",
    "service.tasks.cursor",
    "service.tasks.models",
    "service.idempotency.store",
    "service.security.api_keys",
    "service.security.jwt",
    "service.security.key_admin",
    "service.backup.take",
    "service.backup.drill",
)

GRAPH = importgraph.build()


def in_http_layer(module: str) -> bool:
    return any(fnmatch(module, pattern) for pattern in HTTP_LAYER)


def web_imports(module: str) -> list[list[str]]:
    """Each chain by which ``module`` reaches a web framework."""
    chains = []
    for reached in sorted(GRAPH.reachable(module)):
        for framework in sorted(GRAPH.external[reached] & WEB_FRAMEWORKS):
            chains.append([*GRAPH.path(module, reached), framework])
    return chains


def test_the_named_lower_modules_exist() -> None:
    missing = [module for module in BELOW_HTTP if module not in GRAPH.internal]
    assert not missing
    assert not [module for module in BELOW_HTTP if in_http_layer(module)]


@pytest.mark.parametrize(
    "module", sorted(module for module in GRAPH.internal if not in_http_layer(module))
)
def test_below_the_http_layer_nothing_imports_the_web_framework(module: str) -> None:
    chains = web_imports(module)
    assert not chains, "\n".join(" -> ".join(chain) for chain in chains)


def test_the_check_sees_a_web_import() -> None:
    # The same check on the HTTP layer finds what is there, so an empty answer above means
    # something (a graph that lost its edges would pass every module).
    assert ["service.app", "fastapi"] in web_imports("service.app")
    assert any(chain[-1] == "starlette" for chain in web_imports("service.tasks.router"))


def test_no_import_cycles() -> None:
    assert GRAPH.cycles() == []


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = importgraph.ImportGraph(
        internal={"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, external={}
    )
    assert graph.cycles() == [["a", "b", "c"]]
