"""The health probe paths: never behind the gateway secret, never rate limited.

Kubelet and load balancers call them without credentials or gateway headers; a probe that
could be refused would turn an auth misconfiguration or a traffic spike into pod restarts.
"""

from __future__ import annotations

from fastapi.routing import APIRoute

from service import health

# Taken from the health router itself so a renamed or added probe cannot drift out of the list.
PROBE_PATHS: frozenset[str] = frozenset(
    route.path for route in health.router.routes if isinstance(route, APIRoute)
)


def is_probe(path: str) -> bool:
    return path in PROBE_PATHS
