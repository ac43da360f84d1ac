"""Idempotency-Key on POST /v1/tasks: replay, mismatch, in-flight conflict, expiry, cleanup."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import cast

import asyncpg
import httpx
from sqlalchemy import Table, func, select, update
from taskskit import assert_problem, count_tasks, store_expired_record

from service.db import Database
from service.idempotency.models import IdempotencyRecord
from service.idempotency.store import IdempotencyStore, StoredResponse, advisory_lock_id

records = cast(Table, IdempotencyRecord.__table__)


def _key() -> str:
    return f"key-{uuid.uuid4()}"


async def test_replay_returns_the_original_response(
    client: httpx.AsyncClient, credential, database: Database
) -> None:
    headers = {**credential.headers, "Idempotency-Key": _key()}
    body = {"title": "pay invoice", "tags": ["money"], "due_at": "2030-02-01T12:00:00+02:00"}
    first = await client.post("/v1/tasks", json=body, headers=headers)
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers

    # The task changes in between; the replay still answers what the first request got.
    await client.patch(
        first.headers["location"], json={"title": "paid"}, headers=credential.headers
    )
    replay = await client.post("/v1/tasks", json=body, headers=headers)

    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content  # byte for byte
    assert replay.headers["content-type"] == "application/json"
    assert replay.headers["etag"] == first.headers["etag"]
    assert replay.headers["location"] == first.headers["location"]
    assert await count_tasks(database, credential.owner_id) == 1


async def test_same_meaning_is_the_same_request(client: httpx.AsyncClient, credential) -> None:
    headers = {**credential.headers, "Idempotency-Key": _key(), "Content-Type": "application/json"}
    first = await client.post(
        "/v1/tasks", content=b'{"title": "x", "priority": "high"}', headers=headers
    )
    # Other key order, whitespace, trimmed title, explicit defaults: the same parsed request.
    again = await client.post(
        "/v1/tasks",
        content=b'{ "priority":"high",\n "title": "  x ", "status": "todo", "tags": [] }',
        headers=headers,
    )
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json() == first.json()


async def test_same_key_different_body_is_422(
    client: httpx.AsyncClient, credential, database: Database
) -> None:
    headers = {**credential.headers, "Idempotency-Key": _key()}
    assert (await client.post("/v1/tasks", json={"title": "a"}, headers=headers)).status_code == 201
    response = await client.post("/v1/tasks", json={"title": "b"}, headers=headers)
    assert_problem(response, 422, "idempotency-key-reused")
    assert await count_tasks(database, credential.owner_id) == 1


async def test_quoted_structured_field_form_is_the_same_key(
    client: httpx.AsyncClient, credential
) -> None:
    key = _key()
    first = await client.post(
        "/v1/tasks", json={"title": "q"}, headers={**credential.headers, "Idempotency-Key": key}
    )
    quoted = await client.post(
        "/v1/tasks",
        json={"title": "q"},
        headers={**credential.headers, "Idempotency-Key": f'"{key}"'},
    )
    assert quoted.headers.get("idempotent-replayed") == "true"
    assert quoted.json()["id"] == first.json()["id"]


async def test_without_a_key_every_post_creates(
    client: httpx.AsyncClient, credential, database: Database
) -> None:
    for _ in range(2):
        response = await client.post("/v1/tasks", json={"title": "dup"}, headers=credential.headers)
        assert response.status_code == 201
    assert await count_tasks(database, credential.owner_id, title="dup") == 2


async def test_replay_survives_deleting_the_task(client: httpx.AsyncClient, credential) -> None:
    headers = {**credential.headers, "Idempotency-Key": _key()}
    first = await client.post("/v1/tasks", json={"title": "gone"}, headers=headers)
    await client.delete(first.headers["location"], headers=credential.headers)
    replay = await client.post("/v1/tasks", json={"title": "gone"}, headers=headers)
    # The draft: the response to a key is fixed, whatever happened to the resource since.
    assert replay.status_code == 201
    assert replay.content == first.content


async def test_in_flight_key_is_409(
    client: httpx.AsyncClient, credential, database: Database, database_url: str
) -> None:
    key = _key()
    # Hold the key's lock as a concurrent request would, from another connection.
    holder = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await holder.execute(
            "SELECT pg_advisory_lock($1)", advisory_lock_id(credential.owner_id, key)
        )
        response = await client.post(
            "/v1/tasks",
            json={"title": "busy"},
            headers={**credential.headers, "Idempotency-Key": key},
        )
        assert_problem(response, 409, "idempotency-key-in-use")
        assert response.headers["retry-after"] == "1"
        assert await count_tasks(database, credential.owner_id) == 0
    finally:
        await holder.close()
    # Released: the retry goes through.
    retry = await client.post(
        "/v1/tasks", json={"title": "busy"}, headers={**credential.headers, "Idempotency-Key": key}
    )
    assert retry.status_code == 201
    assert "idempotent-replayed" not in retry.headers


async def test_record_is_kept_for_the_ttl_and_ignored_after(
    client: httpx.AsyncClient, credential, database: Database
) -> None:
    key = _key()
    headers = {**credential.headers, "Idempotency-Key": key}
    first = await client.post("/v1/tasks", json={"title": "old"}, headers=headers)

    async for session in database.session(read_only=True):
        ttl = await session.scalar(
            select(records.c.expires_at - records.c.created_at).where(
                records.c.owner_id == credential.owner_id, records.c.key == key
            )
        )
    assert ttl == timedelta(hours=24)

    async for session in database.session():
        await session.execute(
            update(records)
            .where(records.c.owner_id == credential.owner_id, records.c.key == key)
            .values(expires_at=func.now() - timedelta(seconds=1))
        )
    # Expired: the key is free again, even for a different body, and is overwritten.
    reused = await client.post("/v1/tasks", json={"title": "new"}, headers=headers)
    assert reused.status_code == 201
    assert "idempotent-replayed" not in reused.headers
    assert reused.json()["id"] != first.json()["id"]
    replay = await client.post("/v1/tasks", json={"title": "new"}, headers=headers)
    assert replay.json()["id"] == reused.json()["id"]


async def test_purge_deletes_only_expired_records(credential, database: Database) -> None:
    owner = credential.owner_id
    async for session in database.session():
        await session.execute(
            records.insert(),
            [
                {
                    "owner_id": owner,
                    "key": f"purge-{n}",
                    "method": "POST",
                    "path": "/v1/tasks",
                    "request_hash": "0" * 64,
                    "status_code": 201,
                    "response_body": {},
                    "response_headers": {},
                    "expires_at": datetime.now(UTC) + timedelta(hours=-1 if n < 3 else 1),
                }
                for n in range(5)
            ],
        )
    async for session in database.session():
        store = IdempotencyStore(session, ttl=timedelta(hours=24))
        assert await store.purge_expired() >= 3  # other tests' expired rows may go too
    async for session in database.session(read_only=True):
        left = await session.scalars(
            select(records.c.key).where(records.c.owner_id == owner).order_by(records.c.key)
        )
        assert list(left) == ["purge-3", "purge-4"]


async def test_storing_a_record_purges_expired_ones_sometimes(
    credential, database: Database
) -> None:
    owner = credential.owner_id
    await store_expired_record(database, owner, "stale", expired_for=timedelta(days=2))
    async for session in database.session():
        store = IdempotencyStore(session, ttl=timedelta(hours=24), purge_every=1)
        assert await store.claim(owner, "fresh", "f" * 64) is None
        await store.save(
            owner,
            "fresh",
            method="POST",
            path="/v1/tasks",
            fingerprint="f" * 64,
            response=StoredResponse(201, {"ok": True}, {}),
        )
    async for session in database.session(read_only=True):
        keys = set(await session.scalars(select(records.c.key).where(records.c.owner_id == owner)))
    assert keys == {"fresh"}
