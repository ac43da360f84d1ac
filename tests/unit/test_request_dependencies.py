"""What keeps a request's dependency resolution cheap, checked on the routes themselves.

FastAPI resolves every dependency of a route's tree on every request (about 25 µs each on this
machine, profiled); a credential check once took four of them. These tests fail when a route
grows its tree again, and prove the hand-read credentials match what FastAPI's scheme objects
would have read.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from starlette.requests import Request

from service.security.dependencies import bearer_credential
from service.tasks.router import router

# Route -> the most dependencies its tree may resolve per request.
BUDGET = {
    ("GET", "/v1/tasks/{task_id}"): 1,  # credential, scope and Consistency-Token in one
    ("GET", "/v1/tasks"): 1,  # the same (the query model is parameters, not a dependency)
    ("POST", "/v1/tasks"): 4,
    ("PATCH", "/v1/tasks/{task_id}"): 4,
    ("DELETE", "/v1/tasks/{task_id}"): 4,
}


def count(dependant: Any) -> int:
    return sum(1 + count(sub) for sub in dependant.dependencies)


@pytest.mark.parametrize(("method", "path"), sorted(BUDGET))
def test_each_route_resolves_few_dependencies(method: str, path: str) -> None:
    (route,) = [
        r
        for r in router.routes
        if isinstance(r, APIRoute) and r.path == path and method in (r.methods or ())
    ]
    assert count(route.dependant) <= BUDGET[(method, path)]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer abc.def",
        "bearer tok",
        "BEARER  two",
        "Basic dXNlcjpw",
        "Bearer",
        "Bearer ",
        "Token x",
        "Bearer a b",
    ],
)
async def test_the_bearer_token_is_read_as_fastapis_http_bearer_reads_it(
    authorization: str | None,
) -> None:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    request = Request({"type": "http", "headers": headers, "method": "GET", "path": "/"})
    expected = await HTTPBearer(auto_error=False)(request)
    assert bearer_credential(authorization) == (expected.credentials if expected else None)
