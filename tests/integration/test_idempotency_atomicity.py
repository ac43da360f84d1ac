"""Idempotency-Key atomicity: a POST whose transaction fails at commit leaves nothing behind.

The task and the stored response are written in one transaction (service/idempotency/store.py),
so a failure after both inserts must roll back both: otherwise the client's retry would replay
a response for a task that does not exist, or create a second task.

The failure is real, not mocked: a deferred constraint trigger on the real ``tasks`` table of a
scratch database fires at COMMIT, after the task and the idempotency record were both written,
and raises once (a sequence counts its firings; ``nextval`` is not rolled back).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from taskskit import assert_problem

from service.security.key_admin import issue_api_key
from service.settings import Settings
from testkit import libpq_url

AppClient = Callable[[Settings], Any]
MARKER = "atomicity marker: fail at commit"
TRAP_MESSAGE = "atomicity_trap_refused_commit"

TRAP_DDL = f"""
CREATE SEQUENCE atomicity_trap_firings;

CREATE FUNCTION atomicity_trap() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Only once both rows of the request are in the transaction: the failure is after them.
    IF EXISTS (SELECT 1 FROM idempotency_keys WHERE owner_id = NEW.owner_id)
       AND nextval('atomicity_trap_firings') = 1 THEN
        RAISE EXCEPTION '{TRAP_MESSAGE} for %', NEW.id;
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER atomicity_trap AFTER INSERT ON tasks
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.title = '{MARKER}')
    EXECUTE FUNCTION atomicity_trap();
"""


@pytest.fixture
async def trapped_database(postgres: Any) -> str:
    """A migrated scratch database whose tasks table refuses the marker's first commit."""
    url: str = await postgres.migrated_database("atomicity", TRAP_DDL)
    return url


async def _rows(url: str, owner_id: uuid.UUID) -> tuple[int, int, int]:
    """(tasks, idempotency records) of the owner, and how often the trap fired."""
    conn = await asyncpg.connect(libpq_url(url))
    try:
        tasks = await conn.fetchval("SELECT count(*) FROM tasks WHERE owner_id = $1", owner_id)
        records = await conn.fetchval(
            "SELECT count(*) FROM idempotency_keys WHERE owner_id = $1", owner_id
        )
        fired = await conn.fetchval(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM atomicity_trap_firings"
        )
    finally:
        await conn.close()
    return tasks, records, fired


async def _api_key(settings: Settings, owner_id: uuid.UUID) -> str:
    plaintext, _ = await issue_api_key(
        settings, str(owner_id), ["tasks:read", "tasks:write"], name="", expires_days=None
    )
    return plaintext


async def test_a_failed_commit_stores_neither_task_nor_record_and_the_retry_creates_once(
    trapped_database: str,
    make_settings: Callable[..., Settings],
    app_client: AppClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings(database_url=trapped_database)
    owner_id = uuid.uuid4()
    headers = {"X-API-Key": await _api_key(settings, owner_id), "Idempotency-Key": "retry-me-1"}
    body = {"title": MARKER, "tags": ["atomic"]}

    async with app_client(settings) as client:
        failed = await client.post("/v1/tasks", json=body, headers=headers)

        problem = assert_problem(failed, 500)
        assert problem["request_id"] == failed.headers["x-request-id"]
        assert "location" not in failed.headers
        assert "idempotent-replayed" not in failed.headers
        for leak in ("SELECT", "INSERT", "COMMIT", TRAP_MESSAGE, "atomicity_trap", "plpgsql"):
            assert leak not in failed.text, problem
        # The log names the exception type only, never the database's message.
        logged = capsys.readouterr().out
        assert "unhandled_exception" in logged
        assert TRAP_MESSAGE not in logged
        # The trap fired once, at commit, and the rollback took both rows with it.
        assert await _rows(trapped_database, owner_id) == (0, 0, 1)

        retried = await client.post("/v1/tasks", json=body, headers=headers)
        assert retried.status_code == 201, retried.text
        assert "idempotent-replayed" not in retried.headers
        created = retried.json()
        assert created["title"] == MARKER
        assert retried.headers["location"] == f"/v1/tasks/{created['id']}"
        # The retry ran the whole request again (the trap saw it commit) and stored it once.
        assert await _rows(trapped_database, owner_id) == (1, 1, 2)

        # From now on the key replays the retry's response; still one task.
        replay = await client.post("/v1/tasks", json=body, headers=headers)
        assert replay.status_code == 201
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == retried.content
        listed = await client.get("/v1/tasks", headers={"X-API-Key": headers["X-API-Key"]})
        assert [item["id"] for item in listed.json()["items"]] == [created["id"]]
    assert await _rows(trapped_database, owner_id) == (1, 1, 2)
