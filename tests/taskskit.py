"""Helpers for the Tasks API suites: problem+json assertions, direct inserts, row counts."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx
from sqlalchemy import Table, func, insert, select

from service.db import Database
from service.idempotency.models import IdempotencyRecord
from service.tasks.models import PRIORITY_RANK, Task, TaskPriority

tasks = cast(Table, Task.__table__)
idempotency_records = cast(Table, IdempotencyRecord.__table__)

EPOCH = datetime(2030, 1, 1, tzinfo=UTC)


def assert_problem(
    response: httpx.Response, status: int, slug: str | None = None
) -> dict[str, Any]:
    """The response is RFC 9457 problem+json with this status; returns the body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"].startswith("https://")
    assert body["title"]
    assert body["instance"] == response.request.url.path
    assert body.get("detail"), body
    if slug is not None:
        assert body["type"].endswith("/" + slug), body["type"]
    return body


def pointers(response: httpx.Response) -> set[str]:
    body = assert_problem(response, 422)
    return {error["pointer"] for error in body["errors"]}


async def insert_tasks(
    database: Database, owner_id: uuid.UUID, rows: list[dict[str, Any]]
) -> list[uuid.UUID]:
    """Insert tasks with full control over created_at etc.; returns their ids in order."""
    values = []
    for n, row in enumerate(rows):
        created = row.get("created_at", EPOCH + timedelta(seconds=n))
        priority = row.get("priority", TaskPriority.NORMAL)
        values.append(
            {
                "id": row.get("id", uuid.uuid4()),
                "owner_id": owner_id,
                "title": row.get("title", f"task {n}"),
                "description": row.get("description"),
                "status": row.get("status", "todo"),
                "priority": PRIORITY_RANK[TaskPriority(priority)],
                "due_at": row.get("due_at"),
                "tags": row.get("tags", []),
                "created_at": created,
                "updated_at": created,
            }
        )
    async for session in database.session():
        await session.execute(insert(tasks), values)
    return [value["id"] for value in values]


async def store_expired_record(
    database: Database, owner_id: uuid.UUID, key: str, *, expired_for: timedelta
) -> None:
    """An Idempotency-Key record that expired ``expired_for`` ago (its request: all zeros)."""
    async for session in database.session():
        await session.execute(
            insert(idempotency_records).values(
                owner_id=owner_id,
                key=key,
                method="POST",
                path="/v1/tasks",
                request_hash="0" * 64,
                status_code=201,
                response_body={},
                response_headers={},
                expires_at=func.now() - expired_for,
            )
        )


async def count_tasks(database: Database, owner_id: uuid.UUID, **where: Any) -> int:
    async for session in database.session(read_only=True):
        statement = select(func.count()).select_from(tasks).where(tasks.c.owner_id == owner_id)
        for column, value in where.items():
            statement = statement.where(tasks.c[column] == value)
        count = await session.scalar(statement)
    return int(count or 0)


async def list_all(
    client: httpx.AsyncClient, headers: dict[str, str], **params: Any
) -> list[dict[str, Any]]:
    """Every page of ``GET /v1/tasks`` concatenated, following ``next_cursor``."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(1000):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get("/v1/tasks", params=query, headers=headers)
        assert response.status_code == 200, response.text
        page = response.json()
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("paging did not terminate")
