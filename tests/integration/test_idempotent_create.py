"""The one-statement idempotent create (service/tasks/idempotent_create.py).

It stores a response whose timestamps PostgreSQL spells, and it falls back to the
step-by-step protocol when the key has a record its snapshot does not show. Both are held here
against a real PostgreSQL.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import cast

import httpx
import pytest
from sqlalchemy import DateTime, Table, bindparam, select
from taskskit import count_tasks, store_expired_record

from service.db import Database
from service.idempotency.models import IdempotencyRecord
from service.idempotency.store import StoredResponse
from service.tasks.idempotent_create import KeyAlreadyStoredError, create_once, rfc3339
from service.tasks.models import TaskPriority, TaskStatus
from service.tasks.repository import NewTask
from service.tasks.router import _json

records = cast(Table, IdempotencyRecord.__table__)

INSTANTS = [
    datetime(2026, 12, 3, 18, 22, 37, 711118, tzinfo=UTC),
    datetime(2026, 12, 3, 18, 22, 37, tzinfo=UTC),  # no fraction: orjson writes none
    datetime(2026, 1, 1, 0, 0, 0, 120000, tzinfo=UTC),  # trailing zeros are kept
    datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    # Another offset: the API writes UTC, so must the database, whatever its TimeZone.
    datetime(2030, 2, 1, 12, 0, 0, 500, tzinfo=timezone(timedelta(hours=2))),
]


@pytest.mark.parametrize("instant", INSTANTS, ids=str)
async def test_the_database_spells_a_timestamp_as_the_api_does(
    database: Database, instant: datetime
) -> None:
    expression = rfc3339(bindparam("at", type_=DateTime(timezone=True)))
    async with database.engine.connect() as connection:
        await connection.exec_driver_sql("SET TIME ZONE 'America/New_York'")
        spelled = await connection.scalar(select(expression), {"at": instant})
    assert f'"{spelled}"'.encode() == _json(instant.astimezone(UTC))


def _task(title: str) -> NewTask:
    return NewTask(
        title=title,
        description=None,
        status=TaskStatus.TODO,
        priority=TaskPriority.NORMAL,
        due_at=None,
        tags=(),
    )


async def test_a_record_the_statement_cannot_see_aborts_it_whole(
    credential, database: Database
) -> None:
    """An expired record of the key is invisible to the statement's lookup, like the record of a
    request that committed after the statement's snapshot: the insert of the response collides
    with it, and neither the task nor anything else is applied."""
    owner, key = credential.owner_id, f"expired-{uuid.uuid4()}"
    await store_expired_record(database, owner, key, expired_for=timedelta(seconds=1))
    with pytest.raises(KeyAlreadyStoredError):
        async with database.transaction() as connection:
            await create_once(
                connection,
                owner,
                uuid.uuid4(),
                _task("never"),
                key=key,
                method="POST",
                path="/v1/tasks",
                fingerprint="1" * 64,
                response=StoredResponse(201, {"title": "never"}, {}),
                ttl=timedelta(hours=24),
            )
    assert await count_tasks(database, owner) == 0
    async for session in database.session(read_only=True):
        kept = await session.scalar(
            select(records.c.request_hash).where(records.c.owner_id == owner, records.c.key == key)
        )
    assert kept == "0" * 64


async def test_the_fallback_overwrites_the_expired_record_and_creates_once(
    client: httpx.AsyncClient, credential, database: Database
) -> None:
    """Through the API the same collision costs nothing: the step-by-step protocol creates the
    task and overwrites the expired record, and the next retry replays it."""
    owner, key = credential.owner_id, f"expired-{uuid.uuid4()}"
    await store_expired_record(database, owner, key, expired_for=timedelta(seconds=1))
    headers = {**credential.headers, "Idempotency-Key": key}
    first = await client.post("/v1/tasks", json={"title": "fresh"}, headers=headers)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    again = await client.post("/v1/tasks", json={"title": "fresh"}, headers=headers)
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.content == first.content
    assert await count_tasks(database, owner) == 1


async def test_the_stored_response_is_the_one_sent(
    client: httpx.AsyncClient, credential, database: Database
) -> None:
    """Every field set, an offset due date: the record holds exactly the body that was sent,
    and the database's timestamps, version and ETag are the task's."""
    key = f"full-{uuid.uuid4()}"
    body = {
        "title": "every field",
        "description": "all of them",
        "status": "in_progress",
        "priority": "urgent",
        "due_at": "2031-06-30T23:59:59.000001-07:00",
        "tags": ["a", "b"],
    }
    headers = {**credential.headers, "Idempotency-Key": key}
    sent = await client.post("/v1/tasks", json=body, headers=headers)
    assert sent.status_code == 201, sent.text
    async for session in database.session(read_only=True):
        row = (
            await session.execute(
                select(records.c.response_body, records.c.response_headers).where(
                    records.c.owner_id == credential.owner_id, records.c.key == key
                )
            )
        ).one()
    assert row.response_body == sent.json()
    assert row.response_headers == {
        "Location": sent.headers["location"],
        "ETag": sent.headers["etag"],
    }
    fetched = await client.get(sent.headers["location"], headers=credential.headers)
    assert fetched.content == sent.content
