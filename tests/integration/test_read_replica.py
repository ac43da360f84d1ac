"""With ``DATABASE_READ_URL`` set, reads of /v1/tasks run on the replica engine, writes on the
primary, on connections of their own.

``DATABASE_READ_URL`` points at the same database here; the engines are told apart the way an
operator would: by the ``application_name`` each sends (``<APP_NAME>-primary`` /
``<APP_NAME>-replica``, service/db.py ``create_engine``) as PostgreSQL reports it in
``pg_stat_activity``. To catch each request's own statement there, the test holds an ACCESS
EXCLUSIVE lock on ``tasks`` while the request runs: the request's statement waits on the lock,
visible with its SQL, its backend pid and its application_name, until the lock is released.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest

import appkit
from service.db import Database
from service.replica import ReplicaState
from service.settings import Settings
from testkit import libpq_url

MakeCredential = Callable[..., Awaitable[Any]]
WAIT_SECONDS = 5.0
T = TypeVar("T")


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Database]]:
    """The real app with its lifespan, plus the Database object its requests use."""
    async with appkit.serving(settings) as served:
        yield served.client, served.state.database


@dataclass(frozen=True)
class Backend:
    pid: int
    application_name: str
    query: str


@dataclass(frozen=True)
class Observed:
    """The blocked statement of one request, and the app's pools while it was blocked."""

    waiting: Backend
    others: list[Backend]  # the app's other backends at that moment
    primary_checked_out: int
    replica_checked_out: int
    response: httpx.Response


async def _poll(probe: Callable[[], Awaitable[T | None]], *, timeout: float) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = await probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing observed within {timeout}s")
        await asyncio.sleep(0.02)


async def _app_backends(monitor: asyncpg.Connection, app_name: str) -> list[Backend]:
    rows = await monitor.fetch(
        "SELECT pid, application_name, query, wait_event_type FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name LIKE $1",
        f"{app_name}-%",
    )
    return [Backend(row["pid"], row["application_name"], row["query"]) for row in rows]


async def _observe(
    url: str,
    app_name: str,
    database: Database,
    request: Coroutine[Any, Any, httpx.Response],
) -> Observed:
    """Run ``request`` while ``tasks`` is locked; what PostgreSQL saw waiting for the lock."""
    locker = await asyncpg.connect(libpq_url(url))
    monitor = await asyncpg.connect(libpq_url(url))
    try:
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        pending = asyncio.ensure_future(request)
        try:

            async def waiting() -> tuple[Backend, list[Backend]] | None:
                rows = await monitor.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name LIKE $1 AND wait_event_type = 'Lock'",
                    f"{app_name}-%",
                )
                if not rows:
                    return None
                assert len(rows) == 1, rows
                backends = await _app_backends(monitor, app_name)
                (blocked,) = [b for b in backends if b.pid == rows[0]["pid"]]
                return blocked, [b for b in backends if b.pid != blocked.pid]

            blocked, others = await _poll(waiting, timeout=WAIT_SECONDS)
            primary_out = database.engine.pool.checkedout()  # type: ignore[attr-defined]
            replica_out = database.read_engine.pool.checkedout()  # type: ignore[attr-defined]
        finally:
            await transaction.rollback()
        response = await asyncio.wait_for(pending, WAIT_SECONDS)
    finally:
        await locker.close()
        await monitor.close()
    return Observed(blocked, others, primary_out, replica_out, response)


async def _ready(condition: bool) -> bool | None:
    return True if condition else None


def _assert_on(observed: Observed, app_name: str, role: str, sql: str) -> None:
    waiting = observed.waiting
    assert waiting.application_name == f"{app_name}-{role}", waiting
    assert sql in waiting.query.upper(), waiting.query
    # The app's own pool accounting agrees with the server: one connection checked out, on
    # the engine of that role, none on the other.
    expected = (1, 0) if role == "primary" else (0, 1)
    assert (observed.primary_checked_out, observed.replica_checked_out) == expected


@pytest.fixture
def app_name() -> str:
    # Unique, so no other app's connections to the shared test database are mistaken for ours.
    return f"replica-test-{uuid.uuid4().hex[:8]}"


async def test_reads_run_on_the_replica_and_writes_on_the_primary(
    database_url: str,
    make_settings: Callable[..., Settings],
    make_credential: MakeCredential,
    app_name: str,
) -> None:
    credential = await make_credential()
    headers = credential.headers
    # One poll of the replica monitor, at start-up: a poll in flight would be one more checked
    # out connection in the pool accounting below.
    settings = make_settings(
        app_name=app_name, database_read_url=database_url, database_read_lag_poll_seconds=60
    )

    async with serving(settings) as (client, database):
        assert database.read_engine is not database.engine
        assert database.read_engine.pool is not database.engine.pool
        # A "replica" that is not a standby (the same database here) counts as caught up.
        replica = database.replica
        assert replica is not None
        await _poll(lambda: _ready(replica.state is ReplicaState.STREAMING), timeout=WAIT_SECONDS)

        created = await _observe(
            database_url,
            app_name,
            database,
            client.post("/v1/tasks", json={"title": "routed"}, headers=headers),
        )
        assert created.response.status_code == 201, created.response.text
        _assert_on(created, app_name, "primary", "INSERT INTO TASKS")
        task_id = created.response.json()["id"]
        url = f"/v1/tasks/{task_id}"

        listed = await _observe(
            database_url, app_name, database, client.get("/v1/tasks", headers=headers)
        )
        assert listed.response.status_code == 200, listed.response.text
        assert [item["id"] for item in listed.response.json()["items"]] == [task_id]
        _assert_on(listed, app_name, "replica", "FROM TASKS")
        # A separate server connection from every primary one, open at the same time.
        primary_pids = {b.pid for b in listed.others if b.application_name.endswith("-primary")}
        assert primary_pids, listed.others
        assert listed.waiting.pid not in primary_pids
        replica_pid = listed.waiting.pid

        fetched = await _observe(database_url, app_name, database, client.get(url, headers=headers))
        assert fetched.response.status_code == 200, fetched.response.text
        assert fetched.response.json()["title"] == "routed"
        _assert_on(fetched, app_name, "replica", "FROM TASKS")

        patched = await _observe(
            database_url,
            app_name,
            database,
            client.patch(url, json={"title": "routed again"}, headers=headers),
        )
        assert patched.response.status_code == 200, patched.response.text
        assert patched.response.json()["version"] == 2
        _assert_on(patched, app_name, "primary", "UPDATE TASKS")
        assert patched.waiting.pid != replica_pid

        deleted = await _observe(
            database_url, app_name, database, client.delete(url, headers=headers)
        )
        assert deleted.response.status_code == 204, deleted.response.text
        _assert_on(deleted, app_name, "primary", "DELETE FROM TASKS")
        assert deleted.waiting.pid != replica_pid

        # Afterwards both kinds of connection sit in their pools as distinct server backends.
        monitor = await asyncpg.connect(libpq_url(database_url))
        try:
            backends = await _app_backends(monitor, app_name)
        finally:
            await monitor.close()
        by_role = {
            role: {b.pid for b in backends if b.application_name == f"{app_name}-{role}"}
            for role in ("primary", "replica")
        }
        assert replica_pid in by_role["replica"]
        assert by_role["primary"]
        assert not by_role["primary"] & by_role["replica"]
        assert (await client.get(url, headers=headers)).status_code == 404


async def test_without_a_read_url_reads_share_the_primary(
    database_url: str,
    make_settings: Callable[..., Settings],
    make_credential: MakeCredential,
    app_name: str,
) -> None:
    """The control: the same observation tells the two apart, so it is not always "replica"."""
    credential = await make_credential()
    async with serving(make_settings(app_name=app_name)) as (client, database):
        assert database.read_engine is database.engine
        listed = await _observe(
            database_url, app_name, database, client.get("/v1/tasks", headers=credential.headers)
        )
    assert listed.response.status_code == 200, listed.response.text
    assert listed.waiting.application_name == f"{app_name}-primary"
    assert "FROM TASKS" in listed.waiting.query.upper()
