"""REQUEST_TIMEOUT_SECONDS: a request past its deadline is answered by the app, honestly.

Stalls are real, made by PostgreSQL itself in a scratch database: a trigger sleeps inside the
INSERT (before COMMIT) or inside the COMMIT (a deferred constraint trigger), the first time it
fires only (a sequence counts firings; ``nextval`` is not rolled back), and a lock held by
another session stalls a read. The deadline here is 1 s, the stalls 3 s.

What must hold (service/middleware/deadline.py, service/deadline.py):
- stalled before COMMIT: 503 problem+json with Retry-After; nothing applied; the retry with the
  same Idempotency-Key creates the task once;
- stalled in COMMIT: 504 problem+json ``commit-outcome-unknown``; whatever the outcome, the
  retry with the same key ends with exactly one task (a replay or a create, never two);
- the cancelled request's connection is dropped, not pooled (its state is unknown), and the
  pool serves the next request at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from taskskit import assert_problem

from appkit import serving
from service.db import Database
from service.security.key_admin import issue_api_key
from service.settings import Settings
from testkit import libpq_url

DEADLINE_S = 1.0
STALL_S = 3
# The answer comes at the deadline plus the clean-up of the cancelled connection (at most 2 s,
# SQLAlchemy's close of an invalidated connection); generous for a busy machine.
ANSWERED_WITHIN_S = DEADLINE_S + 2.0 + 2.0
IN_INSERT, IN_COMMIT = "deadline: stall in insert", "deadline: stall in commit"

STALL_DDL = f"""
CREATE SEQUENCE insert_stalls;
CREATE SEQUENCE commit_stalls;

CREATE FUNCTION stall_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('insert_stalls') = 1 THEN PERFORM pg_sleep({STALL_S}); END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER stall_insert BEFORE INSERT ON tasks
    FOR EACH ROW WHEN (NEW.title = '{IN_INSERT}') EXECUTE FUNCTION stall_insert();

CREATE FUNCTION stall_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('commit_stalls') = 1 THEN PERFORM pg_sleep({STALL_S}); END IF;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER stall_commit AFTER INSERT ON tasks
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.title = '{IN_COMMIT}') EXECUTE FUNCTION stall_commit();
"""


@pytest.fixture
async def stalling_database(postgres: Any) -> str:
    url: str = await postgres.migrated_database("deadline", STALL_DDL)
    return url


async def _fetchval(url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(libpq_url(url))
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def _tasks(url: str, owner_id: uuid.UUID) -> int:
    count: int = await _fetchval(url, "SELECT count(*) FROM tasks WHERE owner_id = $1", owner_id)
    return count


async def _wait_for_no_stall(url: str) -> None:
    """Until no backend is still sleeping in a trigger (the cancelled statement's end)."""
    deadline = time.monotonic() + 20
    sql = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
    while await _fetchval(url, sql):
        assert time.monotonic() < deadline, "a stalled statement is still running"
        await asyncio.sleep(0.1)


async def _api_key(settings: Settings, owner_id: uuid.UUID) -> str:
    plaintext, _ = await issue_api_key(
        settings, str(owner_id), ["tasks:read", "tasks:write"], name="", expires_days=None
    )
    return plaintext


@pytest.fixture
def deadline_settings(stalling_database: str, make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(database_url=stalling_database, request_timeout_seconds=DEADLINE_S)


def _pool_idle(database: Database) -> bool:
    return database.pool_status().checked_out == 0


async def test_a_write_stalled_before_commit_is_a_503_and_nothing_is_applied(
    deadline_settings: Settings, stalling_database: str
) -> None:
    owner_id = uuid.uuid4()
    headers = {
        "X-API-Key": await _api_key(deadline_settings, owner_id),
        "Idempotency-Key": "deadline-before-commit",
    }
    body = {"title": IN_INSERT}
    async with serving(deadline_settings) as served:
        database: Database = served.state.database
        started = time.monotonic()
        stalled = await served.client.post("/v1/tasks", json=body, headers=headers)
        elapsed = time.monotonic() - started

        problem = assert_problem(stalled, 503, "request-timeout")
        assert stalled.headers["retry-after"] == "2"
        assert "nothing was applied" in problem["detail"]
        assert DEADLINE_S <= elapsed < ANSWERED_WITHIN_S, elapsed
        # The cancelled request's connection went nowhere near the pool again.
        assert _pool_idle(database), database.pool_status()

        await _wait_for_no_stall(stalling_database)
        assert await _tasks(stalling_database, owner_id) == 0
        assert not await _fetchval(
            stalling_database, "SELECT count(*) FROM idempotency_keys WHERE owner_id = $1", owner_id
        )
        # The retry with the same key runs the request again, once.
        retried = await served.client.post("/v1/tasks", json=body, headers=headers)
        assert retried.status_code == 201, retried.text
        assert "idempotent-replayed" not in retried.headers
        again = await served.client.post("/v1/tasks", json=body, headers=headers)
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == retried.json()["id"]
    assert await _tasks(stalling_database, owner_id) == 1


async def test_a_write_stalled_in_commit_is_a_504_outcome_unknown_and_the_retry_settles_it(
    deadline_settings: Settings, stalling_database: str
) -> None:
    owner_id = uuid.uuid4()
    headers = {
        "X-API-Key": await _api_key(deadline_settings, owner_id),
        "Idempotency-Key": "deadline-in-commit",
    }
    body = {"title": IN_COMMIT}
    async with serving(deadline_settings) as served:
        database: Database = served.state.database
        stalled = await served.client.post("/v1/tasks", json=body, headers=headers)

        problem = assert_problem(stalled, 504, "commit-outcome-unknown")
        assert stalled.headers["retry-after"] == "2"
        assert "may or may not have been applied" in problem["detail"]
        assert _pool_idle(database), database.pool_status()

        await _wait_for_no_stall(stalling_database)
        outcome = await _tasks(stalling_database, owner_id)
        assert outcome in (0, 1)  # either is honest; the retry must settle it without doubling
        retried = await served.client.post("/v1/tasks", json=body, headers=headers)
        assert retried.status_code == 201, retried.text
        replayed = retried.headers.get("idempotent-replayed") == "true"
        assert replayed == (outcome == 1), (outcome, dict(retried.headers))
    assert await _tasks(stalling_database, owner_id) == 1
    print(f"\ncommit cut at the deadline: {'applied' if outcome else 'not applied'}")


async def test_a_read_stalled_on_a_lock_is_a_503_and_the_pool_serves_on(
    deadline_settings: Settings, stalling_database: str
) -> None:
    owner_id = uuid.uuid4()
    headers = {"X-API-Key": await _api_key(deadline_settings, owner_id)}
    async with serving(deadline_settings) as served:
        database: Database = served.state.database
        created = await served.client.post("/v1/tasks", json={"title": "read me"}, headers=headers)
        assert created.status_code == 201
        path = f"/v1/tasks/{created.json()['id']}"

        locker = await asyncpg.connect(libpq_url(stalling_database))
        try:
            locking = locker.transaction()
            await locking.start()
            await locker.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            stalled = await served.client.get(path, headers=headers)
            elapsed = time.monotonic() - started
            assert_problem(stalled, 503, "request-timeout")
            assert elapsed < ANSWERED_WITHIN_S, elapsed
            assert _pool_idle(database), database.pool_status()
            await locking.rollback()
        finally:
            await locker.close()
        # No backend is left waiting on the lock for the abandoned read.
        waiting = (
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        )
        assert await _fetchval(stalling_database, waiting) == 0
        served_again = await served.client.get(path, headers=headers)
        assert served_again.status_code == 200


async def test_a_commit_that_gets_no_answer_is_a_504_outcome_unknown_not_a_503(
    stalling_database: str, make_settings: Callable[..., Settings]
) -> None:
    """Without the deadline: the client-side statement timeout fires while the COMMIT is in
    flight (the server-side one is not sent in pgbouncer-transaction mode, as behind a
    PgBouncer whose role has none). The server never answered, so the app must not say
    "failed": 504 commit-outcome-unknown, and the retry with the same key settles it."""
    settings = make_settings(
        database_url=stalling_database,
        database_pool_mode="pgbouncer-transaction",
        database_statement_timeout_ms=1000,  # the client gives up after 2 s, the stall is 3 s
        request_timeout_seconds=0,
    )
    owner_id = uuid.uuid4()
    headers = {
        "X-API-Key": await _api_key(settings, owner_id),
        "Idempotency-Key": "no-answer-to-commit",
    }
    body = {"title": IN_COMMIT}
    async with serving(settings) as served:
        database: Database = served.state.database
        unanswered = await served.client.post("/v1/tasks", json=body, headers=headers)
        problem = assert_problem(unanswered, 504, "commit-outcome-unknown")
        assert unanswered.headers["retry-after"] == "2"
        assert "may or may not have been applied" in problem["detail"]
        assert _pool_idle(database), database.pool_status()

        await _wait_for_no_stall(stalling_database)
        outcome = await _tasks(stalling_database, owner_id)
        retried = await served.client.post("/v1/tasks", json=body, headers=headers)
        assert retried.status_code == 201, retried.text
        assert (retried.headers.get("idempotent-replayed") == "true") == (outcome == 1)
    assert await _tasks(stalling_database, owner_id) == 1
