"""End to end through the real Zuplo gateway (``zuplo dev``) to the real service on PostgreSQL.

The service runs as in production behind Zuplo: gunicorn, the gateway secret in
``x-zuplo-secret`` (current and previous accepted), gateway-trusted identity on, its own rate
limits off so that any 429 is the gateway's. The gateway runs the committed zuplo/ project with
the API-key policy swapped for a local one (see zuplo_gateway.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gunicorn_harness import Gunicorn, running_gunicorn
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from zuplo_gateway import (
    PROJECT_FILES,
    ZUPLO_DIR,
    Gateway,
    ZuploCli,
    fresh_project,
    link_node_modules,
    require_zuplo_cli,
    running_gateway,
)

from service.security.principal import owner_id_from
from testkit import wait_until

pytestmark = pytest.mark.stack

CURRENT = "current-zuplo-secret-0123456789abcdef0123"
PREVIOUS = "previous-zuplo-secret-0123456789abcdef012"
# Per consumer (or per IP) and minute: above what any one test sends, except the rate-limit test.
REQUESTS_PER_MINUTE = 10
RUN = uuid.uuid4().hex[:8]
READ_WRITE = ["tasks:read", "tasks:write"]
CONSUMERS = {
    "writer": READ_WRITE,
    "alice": READ_WRITE,
    "bob": READ_WRITE,
    "reader": ["tasks:read"],
    "limited": READ_WRITE,
    "router": READ_WRITE,
    "big": READ_WRITE,
    "rotating": READ_WRITE,
}


def consumer_id(name: str) -> str:
    return f"{name}-{RUN}"


def key(name: str) -> dict[str, str]:
    """The consumer's gateway API key, as a client sends it."""
    return {"Authorization": f"Bearer zpka_test_{name}_{RUN}"}


def gateway_consumers() -> dict[str, Any]:
    return {
        f"zpka_test_{name}_{RUN}": {"sub": consumer_id(name), "scopes": scopes}
        for name, scopes in CONSUMERS.items()
    }


@pytest.fixture(scope="module")
def zuplo_cli() -> ZuploCli:
    return require_zuplo_cli()


@pytest.fixture(scope="module")
def served(
    zuplo_cli: ZuploCli, tmp_path_factory: pytest.TempPathFactory, database_url: str
) -> Iterator[tuple[Gunicorn, Gateway]]:
    """The service, then the gateway in front of it. One after the other: side by side, the
    gateway's build starves gunicorn's start on a busy two-core machine."""
    with running_gunicorn(
        tmp_path_factory.mktemp("service"),
        database_url=database_url,
        workers=1,
        environment="staging",
        gateway_shared_secret=CURRENT,
        gateway_shared_secret_previous=PREVIOUS,
        gateway_secret_header="x-zuplo-secret",
        gateway_identity_enabled="true",
        rate_limit_enabled="false",
    ) as service:
        project = gateway_project(tmp_path_factory, service.url, CURRENT)
        with running_gateway(zuplo_cli, project) as gateway:
            yield service, gateway


@pytest.fixture(scope="module")
def service(served: tuple[Gunicorn, Gateway]) -> Gunicorn:
    return served[0]


@pytest.fixture(scope="module")
def gateway(served: tuple[Gunicorn, Gateway]) -> Gateway:
    return served[1]


def gateway_project(tmp_path_factory: pytest.TempPathFactory, base_url: str, secret: str) -> Path:
    return fresh_project(
        tmp_path_factory.mktemp("gateway") / "project",
        env={"BASE_URL": base_url, "GATEWAY_SHARED_SECRET": secret},
        consumers=gateway_consumers(),
        requests_per_minute=REQUESTS_PER_MINUTE,
    )


def service_saw(service: Gunicorn, consumer: str) -> list[dict[str, Any]]:
    """The service's access-log records of this consumer's requests."""
    return [
        record
        for record in service.log_records()
        if record.get("event") == "request" and record.get("principal") == consumer_id(consumer)
    ]


def settled(service: Gunicorn, consumer: str, count: int) -> list[dict[str, Any]]:
    # The access log is written as the response finishes: wait for the last line, not a sleep.
    return wait_until(
        lambda: (records := service_saw(service, consumer)) and len(records) >= count and records,
        timeout=10,
        what=f"{count} access-log records of {consumer}",
    )


def test_through_the_gateway_the_secret_is_added_and_the_request_succeeds(
    gateway: Gateway, service: Gunicorn
) -> None:
    created = httpx.post(
        f"{gateway.url}/v1/tasks", headers=key("writer"), json={"title": "via zuplo"}, timeout=30
    )
    assert created.status_code == 201, created.text
    assert created.json()["title"] == "via zuplo"
    # A secret the client makes up is overwritten by the gateway's, not appended to it (two
    # values would be refused by the service).
    forged = {**key("writer"), "x-zuplo-secret": "client-made-up"}
    listed = httpx.get(f"{gateway.url}/v1/tasks", headers=forged, timeout=30)
    assert listed.status_code == 200, listed.text
    assert [task["id"] for task in listed.json()["items"]] == [created.json()["id"]]


def test_straight_to_the_service_without_the_secret_is_refused(
    gateway: Gateway, service: Gunicorn
) -> None:
    for headers in (
        key("writer"),
        {**key("writer"), "x-zuplo-secret": "guessed"},
        {"X-Consumer-Id": consumer_id("writer")},
    ):
        response = httpx.get(f"{service.url}/v1/tasks", headers=headers, timeout=30)
        assert response.status_code == 403, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"].endswith("/gateway-required")
    # The consumer header without the secret is ignored, and said so.
    wait_until(
        lambda: any(r.get("event") == "gateway_consumer_ignored" for r in service.log_records()),
        timeout=10,
        what="gateway_consumer_ignored logged",
    )


def test_the_previous_secret_keeps_working_during_a_rotation(
    zuplo_cli: ZuploCli,
    tmp_path_factory: pytest.TempPathFactory,
    gateway: Gateway,
    service: Gunicorn,
) -> None:
    """Mid-rotation the service holds the new secret and the old one; a gateway not yet switched
    (the old secret) and one already switched (the new) both get through."""
    project = gateway_project(tmp_path_factory, service.url, PREVIOUS)
    with running_gateway(zuplo_cli, project) as not_yet_switched:
        for url in (not_yet_switched.url, gateway.url):
            response = httpx.get(f"{url}/v1/tasks", headers=key("rotating"), timeout=30)
            assert response.status_code == 200, response.text
    assert len(settled(service, "rotating", 2)) == 2
    # A secret that is neither is refused.
    stale = httpx.get(f"{service.url}/v1/tasks", headers={"x-zuplo-secret": "x" * 40}, timeout=30)
    assert stale.status_code == 403


def test_the_gateway_answers_429_before_the_service_sees_the_request(
    gateway: Gateway, service: Gunicorn
) -> None:
    statuses: list[int] = []
    limited: httpx.Response | None = None
    # A fixed window can restart mid-test, so up to two windows' worth before the first 429.
    for _ in range(2 * REQUESTS_PER_MINUTE + 1):
        response = httpx.get(f"{gateway.url}/v1/tasks", headers=key("limited"), timeout=30)
        statuses.append(response.status_code)
        if response.status_code == 429:
            limited = response
            break
    assert limited is not None, statuses
    assert set(statuses[:-1]) == {200}
    assert len(statuses) - 1 >= REQUESTS_PER_MINUTE
    assert limited.headers["content-type"].startswith("application/problem+json")
    assert int(limited.headers["retry-after"]) > 0
    # Every request that got through reached the service; the refused one never did.
    assert len(settled(service, "limited", len(statuses) - 1)) == len(statuses) - 1
    another = httpx.get(f"{gateway.url}/v1/tasks", headers=key("alice"), timeout=30)
    assert another.status_code == 200  # the budget is per consumer


def test_a_body_over_the_services_limit_is_refused_by_the_gateway(
    gateway: Gateway, service: Gunicorn
) -> None:
    policies = json.loads((ZUPLO_DIR / "config" / "policies.json").read_text())
    limit = next(p for p in policies["policies"] if p["name"] == "request-size-limit")
    max_bytes = limit["handler"]["options"]["maxSizeInBytes"]
    body = json.dumps({"title": "x", "description": "y" * max_bytes}).encode()
    response = httpx.post(
        f"{gateway.url}/v1/tasks",
        headers={**key("big"), "content-type": "application/json"},
        content=body,
        timeout=60,
    )
    assert response.status_code == 413, response.text[:500]
    small = httpx.post(f"{gateway.url}/v1/tasks", headers=key("big"), json={"title": "ok"})
    assert small.status_code == 201
    assert [r["status"] for r in settled(service, "big", 1)] == [201]


async def test_the_gateway_consumer_is_the_owner_and_cannot_be_forged(
    gateway: Gateway, service: Gunicorn, database_url: str
) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        created = await client.post("/v1/tasks", headers=key("alice"), json={"title": "alice's"})
        assert created.status_code == 201, created.text
        task_id = created.json()["id"]
        # Bob names Alice in the consumer header: the gateway replaces it with Bob.
        as_bob = {**key("bob"), "X-Consumer-Id": consumer_id("alice")}
        assert (await client.get(f"/v1/tasks/{task_id}", headers=as_bob)).status_code == 404
        bobs = await client.get("/v1/tasks", headers=as_bob)
        assert bobs.json()["items"] == []
        # No key at all, only the header: the gateway removes it, the service asks for a key.
        anonymous = {"X-Consumer-Id": consumer_id("alice"), "X-Consumer-Scopes": "admin"}
        assert (await client.get(f"/v1/tasks/{task_id}", headers=anonymous)).status_code == 401
        # Alice's own key does reach her task.
        assert (await client.get(f"/v1/tasks/{task_id}", headers=key("alice"))).status_code == 200
        # Scopes come from the consumer's metadata: a read-only consumer cannot write, and
        # cannot widen its scopes with a header of its own.
        as_reader = {**key("reader"), "X-Consumer-Scopes": "tasks:write admin"}
        assert (await client.get("/v1/tasks", headers=as_reader)).status_code == 200
        refused = await client.post("/v1/tasks", headers=as_reader, json={"title": "no"})
        assert refused.status_code == 403, refused.text
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            owner = await conn.scalar(
                text("SELECT owner_id FROM tasks WHERE id = :id"), {"id": task_id}
            )
    finally:
        await engine.dispose()
    assert owner == owner_id_from(consumer_id("alice"))


def test_every_generated_route_reaches_the_service(gateway: Gateway, service: Gunicorn) -> None:
    routes = json.loads((ZUPLO_DIR / "config" / "routes.oas.json").read_text())
    generated = {
        (method.upper(), path)
        for path, item in routes["paths"].items()
        for method in item
        if not method.startswith("x-")
    }
    client = httpx.Client(base_url=gateway.url, headers=key("router"), timeout=30)
    state: dict[str, Any] = {}

    def create() -> httpx.Response:
        response = client.post("/v1/tasks", json={"title": "every route"})
        state["id"] = response.json().get("id")
        return response

    def read() -> httpx.Response:
        response = client.get(f"/v1/tasks/{state['id']}")
        state["etag"] = response.headers.get("etag")
        return response

    calls: dict[tuple[str, str], tuple[Callable[[], httpx.Response], int]] = {
        ("POST", "/v1/tasks"): (create, 201),
        ("GET", "/v1/tasks"): (lambda: client.get("/v1/tasks", params={"limit": 5}), 200),
        ("GET", "/v1/tasks/{task_id}"): (read, 200),
        ("PATCH", "/v1/tasks/{task_id}"): (
            lambda: client.patch(
                f"/v1/tasks/{state['id']}",
                json={"status": "done"},
                headers={"If-Match": state["etag"], "content-type": "application/merge-patch+json"},
            ),
            200,
        ),
        ("DELETE", "/v1/tasks/{task_id}"): (
            lambda: client.delete(f"/v1/tasks/{state['id']}"),
            204,
        ),
    }
    # A route added to the service (and so to routes.oas.json) needs a call here.
    assert set(calls) == generated
    with client:
        for route, (call, expected) in calls.items():
            response = call()
            assert response.status_code == expected, (route, response.text)
    seen = {(r["method"], r["route"]) for r in settled(service, "router", len(calls))}
    assert seen == generated


def test_health_and_metrics_are_not_routed(gateway: Gateway) -> None:
    for path in ("/health", "/health/live", "/health/ready", "/metrics", "/openapi.json"):
        response = httpx.get(f"{gateway.url}{path}", timeout=30)
        assert response.status_code == 404, (path, response.text[:300])


def test_zuplo_lint_passes(zuplo_cli: ZuploCli, tmp_path: Path) -> None:
    """The committed project as Zuplo's own linter sees it (offline), api-key-inbound included."""
    project = tmp_path / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        source = ZUPLO_DIR / name
        if source.is_dir():
            shutil.copytree(source, project / name)
        else:
            shutil.copy2(source, project / name)
    link_node_modules(ZUPLO_DIR / "node_modules", project / "node_modules")
    result = subprocess.run(
        [str(zuplo_cli.node), str(zuplo_cli.cli), "lint", "--format", "json"],
        cwd=project,
        env=zuplo_cli.env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
