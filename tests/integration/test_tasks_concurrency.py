"""Behaviour under concurrency: keyset paging while tasks are being inserted, one
Idempotency-Key raced by 20 requests, and optimistic concurrency with If-Match."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from taskskit import assert_problem, count_tasks, insert_tasks

from service.db import Database

PRIORITIES = ["low", "normal", "high", "urgent"]


@pytest.mark.parametrize("sort", ["-created_at", "created_at", "due_at", "-due_at", "priority"])
async def test_paging_is_stable_while_tasks_are_inserted(
    client: httpx.AsyncClient, credential, database: Database, sort: str
) -> None:
    now = datetime.now(UTC)
    # Existing tasks straddle "now", so concurrent inserts (created_at = now) land both in
    # pages already read and in pages still to come; likewise for due dates and priorities.
    seed = [
        {
            "created_at": now + timedelta(minutes=n - 20),
            "due_at": None if n % 4 == 0 else now + timedelta(hours=(n * 7) % 40 - 20),
            "priority": PRIORITIES[n % 4],
        }
        for n in range(40)
    ]
    existing = {str(i) for i in await insert_tasks(database, credential.owner_id, seed)}

    inserted: list[str] = []
    progress = asyncio.Event()
    stop = asyncio.Event()

    async def insert_continuously() -> None:
        n = 0
        while not stop.is_set():
            due = None if n % 3 == 0 else (now + timedelta(hours=(n * 5) % 40 - 20)).isoformat()
            response = await client.post(
                "/v1/tasks",
                json={"title": f"concurrent {n}", "due_at": due, "priority": PRIORITIES[n % 4]},
                headers=credential.headers,
            )
            assert response.status_code == 201, response.text
            inserted.append(response.json()["id"])
            progress.set()
            n += 1

    inserter = asyncio.create_task(insert_continuously())
    seen: list[str] = []
    try:
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"sort": sort, "limit": 3}
            if cursor:
                params["cursor"] = cursor
            page = (await client.get("/v1/tasks", params=params, headers=credential.headers)).json()
            seen.extend(item["id"] for item in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
            # Make sure at least one insert commits between every two pages.
            progress.clear()
            await asyncio.wait_for(progress.wait(), timeout=10)
    finally:
        stop.set()
        await inserter

    assert len(seen) == len(set(seen)), "a task was returned twice"
    assert existing <= set(seen), "a task that existed before paging started was skipped"
    assert len(inserted) >= 13  # one per page boundary at least: the race really happened


async def test_twenty_concurrent_posts_with_one_key_create_one_task(
    client: httpx.AsyncClient, credential, database: Database
) -> None:
    key = str(uuid.uuid4())
    title = f"once {key}"
    headers = {**credential.headers, "Idempotency-Key": key}

    responses = await asyncio.gather(
        *(client.post("/v1/tasks", json={"title": title}, headers=headers) for _ in range(20))
    )

    assert await count_tasks(database, credential.owner_id, title=title) == 1
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {201, 409}, statuses
    created = [r for r in responses if r.status_code == 201]
    originals = [r for r in created if "idempotent-replayed" not in r.headers]
    assert len(originals) == 1
    for replay in created:
        assert replay.json() == originals[0].json()
        assert replay.headers["etag"] == originals[0].headers["etag"]
        assert replay.headers["location"] == originals[0].headers["location"]
    for replay in created[1:]:
        if replay is not originals[0]:
            assert replay.headers["idempotent-replayed"] == "true"
    for conflict in (r for r in responses if r.status_code == 409):
        assert_problem(conflict, 409, "idempotency-key-in-use")
        assert conflict.headers["retry-after"] == "1"

    # Once the first request has finished, every retry is a replay.
    retry = await client.post("/v1/tasks", json={"title": title}, headers=headers)
    assert retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json() == originals[0].json()


async def test_concurrent_patches_with_one_etag_exactly_one_wins(
    client: httpx.AsyncClient, credential
) -> None:
    created = await client.post("/v1/tasks", json={"title": "v1"}, headers=credential.headers)
    location, etag = created.headers["location"], created.headers["etag"]

    responses = await asyncio.gather(
        *(
            client.patch(
                location,
                json={"title": f"writer {n}"},
                headers={**credential.headers, "If-Match": etag},
            )
            for n in range(6)
        )
    )

    winners = [r for r in responses if r.status_code == 200]
    assert len(winners) == 1, [r.status_code for r in responses]
    for loser in (r for r in responses if r.status_code != 200):
        assert_problem(loser, 412, "precondition-failed")
    final = (await client.get(location, headers=credential.headers)).json()
    assert final["version"] == 2
    assert final["title"] == winners[0].json()["title"]


async def test_concurrent_unconditional_patches_all_apply(
    client: httpx.AsyncClient, credential
) -> None:
    # Without If-Match there is no lost update either: each PATCH is one atomic UPDATE.
    created = await client.post("/v1/tasks", json={"title": "count"}, headers=credential.headers)
    location = created.headers["location"]
    responses = await asyncio.gather(
        *(
            client.patch(location, json={"description": str(n)}, headers=credential.headers)
            for n in range(8)
        )
    )
    assert sorted(r.json()["version"] for r in responses) == list(range(2, 10))
