"""Create, read, update (JSON merge patch) and delete through the real app and database."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import httpx
import pytest
from sqlalchemy import select
from taskskit import assert_problem, tasks

from service.db import Database


async def test_create_returns_201_location_etag_and_the_task(
    client: httpx.AsyncClient, credential, database: Database
) -> None:
    response = await client.post(
        "/v1/tasks",
        json={
            "title": "  Ship it  ",
            "description": "Release notes",
            "priority": "urgent",
            "status": "in_progress",
            "due_at": "2030-01-31T18:00:00+01:00",
            "tags": ["release", "backend"],
        },
        headers=credential.headers,
    )
    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    task = response.json()
    assert response.headers["location"] == f"/v1/tasks/{task['id']}"
    assert response.headers["etag"] == '"1"'
    assert task["title"] == "Ship it"  # trimmed
    assert task["due_at"] == "2030-01-31T17:00:00Z"  # returned in UTC
    assert task["priority"] == "urgent"
    assert task["status"] == "in_progress"
    assert task["tags"] == ["release", "backend"]
    assert task["version"] == 1
    assert task["created_at"] == task["updated_at"]
    assert task["created_at"].endswith("Z")
    assert list(task) == [
        "id", "title", "description", "status", "priority", "due_at", "tags",
        "created_at", "updated_at", "version",
    ]  # fmt: skip

    async for session in database.session(read_only=True):
        row = (
            await session.execute(
                select(tasks.c.owner_id, tasks.c.priority).where(
                    tasks.c.id == uuid.UUID(task["id"])
                )
            )
        ).one()
    assert row.owner_id == credential.owner_id
    assert row.priority == 3  # stored as a rank, so sort=priority is an index scan


async def test_create_applies_defaults(client: httpx.AsyncClient, credential) -> None:
    task = (await client.post("/v1/tasks", json={"title": "x"}, headers=credential.headers)).json()
    assert task["status"] == "todo"
    assert task["priority"] == "normal"
    assert task["description"] is None
    assert task["due_at"] is None
    assert task["tags"] == []


async def test_get_returns_the_task_with_its_etag(client: httpx.AsyncClient, credential) -> None:
    created = await client.post("/v1/tasks", json={"title": "read me"}, headers=credential.headers)
    response = await client.get(created.headers["location"], headers=credential.headers)
    assert response.status_code == 200
    assert response.json() == created.json()
    assert response.headers["etag"] == created.headers["etag"]


@pytest.mark.parametrize(
    "task_id",
    [
        "00000000-0000-4000-8000-000000000000",  # well-formed, does not exist
        "not-a-uuid",  # malformed: also just a task that does not exist
        "0" * 32,  # a UUID without hyphens is not the canonical id
        "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz",  # the right length, not a UUID
    ],
)
async def test_unknown_or_malformed_id_is_404(
    client: httpx.AsyncClient, credential, task_id: str
) -> None:
    for method in ("GET", "DELETE"):
        response = await client.request(method, f"/v1/tasks/{task_id}", headers=credential.headers)
        assert_problem(response, 404, "not-found")
    response = await client.patch(
        f"/v1/tasks/{task_id}", json={"title": "x"}, headers=credential.headers
    )
    assert_problem(response, 404, "not-found")


async def test_patch_is_a_merge_patch(client: httpx.AsyncClient, credential) -> None:
    created = (
        await client.post(
            "/v1/tasks",
            json={
                "title": "before",
                "description": "keep me?",
                "due_at": "2030-05-01T00:00:00Z",
                "tags": ["a", "b"],
                "priority": "low",
            },
            headers=credential.headers,
        )
    ).json()
    response = await client.patch(
        f"/v1/tasks/{created['id']}",
        content=b'{"description": null, "due_at": null, "tags": ["c"], "status": "done"}',
        headers={**credential.headers, "Content-Type": "application/merge-patch+json"},
    )
    assert response.status_code == 200, response.text
    task = response.json()
    assert task["description"] is None  # null clears
    assert task["due_at"] is None
    assert task["tags"] == ["c"]  # arrays are replaced, not merged
    assert task["status"] == "done"
    assert task["title"] == "before"  # absent fields are untouched
    assert task["priority"] == "low"
    assert task["version"] == 2
    assert response.headers["etag"] == '"2"'
    assert task["updated_at"] > created["updated_at"]
    assert task["created_at"] == created["created_at"]
    # The change is durable, not just echoed.
    fetched = await client.get(f"/v1/tasks/{created['id']}", headers=credential.headers)
    assert fetched.json() == task


async def test_patch_accepts_application_json_and_trims(
    client: httpx.AsyncClient, credential
) -> None:
    created = (
        await client.post("/v1/tasks", json={"title": "a"}, headers=credential.headers)
    ).json()
    response = await client.patch(
        f"/v1/tasks/{created['id']}",
        json={"title": "  renamed ", "priority": "high", "due_at": "2031-01-01T01:00:00+01:00"},
        headers=credential.headers,
    )
    assert response.status_code == 200
    task = response.json()
    assert (task["title"], task["priority"], task["due_at"]) == (
        "renamed",
        "high",
        "2031-01-01T00:00:00Z",
    )


async def test_empty_patch_changes_nothing(client: httpx.AsyncClient, credential) -> None:
    created = await client.post("/v1/tasks", json={"title": "same"}, headers=credential.headers)
    response = await client.patch(created.headers["location"], json={}, headers=credential.headers)
    assert response.status_code == 200
    assert response.json() == created.json()
    assert response.headers["etag"] == '"1"'


async def test_delete_then_gone(client: httpx.AsyncClient, credential) -> None:
    location = (
        await client.post("/v1/tasks", json={"title": "bye"}, headers=credential.headers)
    ).headers["location"]
    response = await client.delete(location, headers=credential.headers)
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(await client.get(location, headers=credential.headers), 404)
    assert_problem(await client.delete(location, headers=credential.headers), 404)


async def test_scopes(client: httpx.AsyncClient, make_credential: Callable[..., Awaitable]) -> None:
    owner = uuid.uuid4()
    reader = await make_credential(scopes=("tasks:read",), owner_id=owner)
    writer = await make_credential(scopes=("tasks:write",), owner_id=owner)
    admin = await make_credential(scopes=("admin",), owner_id=owner)

    assert_problem(await client.post("/v1/tasks", json={"title": "x"}, headers=reader.headers), 403)
    created = await client.post("/v1/tasks", json={"title": "x"}, headers=writer.headers)
    assert created.status_code == 201
    location = created.headers["location"]
    # tasks:write alone does not grant reading.
    assert_problem(await client.get(location, headers=writer.headers), 403, "forbidden")
    assert_problem(await client.get("/v1/tasks", headers=writer.headers), 403)
    assert (await client.get(location, headers=reader.headers)).status_code == 200
    assert (await client.get("/v1/tasks", headers=reader.headers)).status_code == 200
    assert_problem(await client.patch(location, json={"title": "y"}, headers=reader.headers), 403)
    assert_problem(await client.delete(location, headers=reader.headers), 403)
    # admin implies every scope.
    assert (await client.get(location, headers=admin.headers)).status_code == 200
    assert (await client.delete(location, headers=admin.headers)).status_code == 204


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/tasks"),
        ("POST", "/v1/tasks"),
        ("GET", "/v1/tasks/00000000-0000-4000-8000-000000000000"),
        ("PATCH", "/v1/tasks/00000000-0000-4000-8000-000000000000"),
        ("DELETE", "/v1/tasks/00000000-0000-4000-8000-000000000000"),
    ],
)
async def test_every_route_needs_credentials(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    body = {"title": "x"} if method in {"POST", "PATCH"} else None
    response = await client.request(method, path, json=body)
    assert_problem(response, 401, "unauthorized")
    assert "www-authenticate" in response.headers
    # An anonymous request with the wrong media type is still a 401 first.
    if method in {"POST", "PATCH"}:
        response = await client.request(
            method, path, content=b"x", headers={"Content-Type": "text/plain"}
        )
        assert_problem(response, 401)
