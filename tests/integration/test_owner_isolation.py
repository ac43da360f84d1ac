"""Another owner's task is indistinguishable from a missing one, on every route."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from taskskit import assert_problem, list_all

MISSING = "/v1/tasks/00000000-0000-4000-8000-000000000000"


def _comparable(problem: dict[str, Any]) -> dict[str, Any]:
    # instance names the URL and request_id differs per request; everything else must match.
    return {k: v for k, v in problem.items() if k not in {"instance", "request_id"}}


@pytest.fixture
async def alice(make_credential):
    return await make_credential()


@pytest.fixture
async def mallory(make_credential):
    return await make_credential()


async def test_every_route_hides_other_owners_tasks(
    client: httpx.AsyncClient, alice, mallory
) -> None:
    created = await client.post(
        "/v1/tasks", json={"title": "alice's secret", "tags": ["private"]}, headers=alice.headers
    )
    location = created.headers["location"]
    original = created.json()

    attempts: list[tuple[str, dict[str, Any]]] = [
        ("GET", {}),
        ("GET", {"headers": {"If-None-Match": "*"}}),
        ("PATCH", {"json": {"title": "pwned"}}),
        ("PATCH", {"json": {"title": "pwned"}, "headers": {"If-Match": "*"}}),
        ("PATCH", {"json": {}}),
        ("DELETE", {}),
        ("DELETE", {"headers": {"If-Match": '"1"'}}),
    ]
    for method, options in attempts:
        headers = {**mallory.headers, **options.pop("headers", {})}
        theirs = await client.request(method, location, headers=headers, **options)
        missing = await client.request(method, MISSING, headers=headers, **options)
        assert _comparable(assert_problem(theirs, 404)) == _comparable(
            assert_problem(missing, 404)
        ), method
        assert set(theirs.headers) - {"x-request-id", "x-correlation-id", "content-length"} == (
            set(missing.headers) - {"x-request-id", "x-correlation-id", "content-length"}
        )

    # Never in lists, whatever the filter or sort: Mallory sees her own task only.
    own = await client.post(
        "/v1/tasks", json={"title": "a secret too", "tags": ["private"]}, headers=mallory.headers
    )
    for params in ({}, {"tag": "private"}, {"q": "secret"}, {"sort": "priority"},
                   {"sort": "due_at"}, {"status": "todo"}):  # fmt: skip
        items = await list_all(client, mallory.headers, **params)
        assert [item["id"] for item in items] == [own.json()["id"]], params

    # And none of the attempts changed anything.
    current = await client.get(location, headers=alice.headers)
    assert current.status_code == 200
    assert current.json() == original


async def test_idempotency_keys_are_per_owner(client: httpx.AsyncClient, alice, mallory) -> None:
    key = {"Idempotency-Key": "shared-key-123"}
    first = await client.post(
        "/v1/tasks", json={"title": "alice"}, headers={**alice.headers, **key}
    )
    # Mallory reusing Alice's key neither replays Alice's response nor collides with it.
    second = await client.post(
        "/v1/tasks", json={"title": "mallory"}, headers={**mallory.headers, **key}
    )
    assert first.status_code == second.status_code == 201
    assert "idempotent-replayed" not in second.headers
    assert second.json()["id"] != first.json()["id"]
    # Even with Alice's exact body.
    third = await client.post(
        "/v1/tasks", json={"title": "alice"}, headers={**mallory.headers, "Idempotency-Key": "k2"}
    )
    fourth = await client.post(
        "/v1/tasks", json={"title": "alice"}, headers={**alice.headers, "Idempotency-Key": "k2"}
    )
    assert "idempotent-replayed" not in fourth.headers
    assert third.json()["id"] != fourth.json()["id"]
