"""Readiness and the schema: the app never migrates, and says so when the schema is not at head.

Migrations belong to ``python -m service migrate`` (the Helm pre-upgrade hook); an instance
started against an empty or older database must create nothing and stay out of the load
balancer until the schema is at the revision its code expects, then come in without a restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from taskskit import assert_problem

from service import __version__
from service.migrate import downgrade, head_revisions, upgrade
from service.settings import Settings
from testkit import free_port, libpq_url

AppClient = Callable[[Settings], Any]
HEAD = ",".join(sorted(head_revisions()))


async def _user_tables(url: str) -> set[str]:
    """Every table outside the system schemas, schema-qualified."""
    conn = await asyncpg.connect(libpq_url(url))
    try:
        rows = await conn.fetch(
            "SELECT schemaname || '.' || tablename AS name FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        )
    finally:
        await conn.close()
    return {row["name"] for row in rows}


async def _execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(libpq_url(url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _assert_not_ready(response: httpx.Response, slug: str) -> None:
    assert_problem(response, 503, slug)
    assert response.headers["retry-after"] == "5"


def _assert_summary(response: httpx.Response, status: int, database: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == ("healthy" if status == 200 else "unhealthy")
    assert body["database"] == database


async def test_start_against_an_empty_database_creates_nothing_and_is_not_ready(
    postgres: Any, make_settings: Callable[..., Settings], app_client: AppClient
) -> None:
    url = await postgres.create_database("empty")
    assert await _user_tables(url) == set()

    async with app_client(make_settings(database_url=url)) as client:
        ready = await client.get("/health/ready")
        live = await client.get("/health/live")
        summary = await client.get("/health")

    # The database answers; it was never migrated (the app deployed before its migration ran):
    # an outdated schema, not an outage (db_up stays 1, the DatabaseUnavailable alert quiet).
    _assert_not_ready(ready, "outdated-schema")
    assert live.status_code == 200
    assert live.json() == {"status": "ok"}
    _assert_summary(summary, 503, "outdated-schema")
    # Lifespan start, three probes and lifespan shutdown later: still not a single table.
    assert await _user_tables(url) == set()


async def test_readiness_follows_the_schema_revision_without_a_restart(
    postgres: Any, make_settings: Callable[..., Settings], app_client: AppClient
) -> None:
    url = await postgres.create_database("behind")
    await upgrade(url)

    async with app_client(make_settings(database_url=url)) as client:
        ready = await client.get("/health/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready", "schema_revision": HEAD}

        # Behind head: every migration undone, alembic_version left empty.
        await downgrade(url, "base")
        assert await _user_tables(url) == {"public.alembic_version"}
        _assert_not_ready(await client.get("/health/ready"), "outdated-schema")
        _assert_summary(await client.get("/health"), 503, "outdated-schema")
        assert (await client.get("/health/live")).status_code == 200

        # The hook migrates; the same app (same lifespan, same pool) comes back in.
        await upgrade(url)
        ready = await client.get("/health/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready", "schema_revision": HEAD}
        _assert_summary(await client.get("/health"), 200, "connected")

        # A revision this code does not know (a newer release's schema after a rollback of the
        # code, or a stray row) is not ready either, and again nothing is cached.
        await _execute(url, "UPDATE alembic_version SET version_num = 'ffffffffffff'")
        _assert_not_ready(await client.get("/health/ready"), "outdated-schema")
        _assert_summary(await client.get("/health"), 503, "outdated-schema")
        # Two heads recorded where the code expects one is not the expected revision either.
        await _execute(url, f"UPDATE alembic_version SET version_num = '{HEAD}'")
        await _execute(url, "INSERT INTO alembic_version (version_num) VALUES ('ffffffffffff')")
        _assert_not_ready(await client.get("/health/ready"), "outdated-schema")
        await _execute(url, "DELETE FROM alembic_version WHERE version_num = 'ffffffffffff'")
        assert (await client.get("/health/ready")).status_code == 200


async def test_summary_is_503_unhealthy_when_the_database_is_unreachable(
    make_settings: Callable[..., Settings], app_client: AppClient
) -> None:
    down = f"postgresql+asyncpg://app:pw@127.0.0.1:{free_port()}/app"
    settings = make_settings(database_url=down, database_connect_timeout=1, version="9.9.9-test")
    async with app_client(settings) as client:
        started = time.monotonic()
        response = await client.get("/health")
        elapsed = time.monotonic() - started

    assert response.status_code == 503, response.text
    # The documented Render-shaped summary, not a problem document.
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"status", "database", "version", "timestamp"}
    assert body["status"] == "unhealthy"
    assert body["database"] == "unavailable"
    assert body["version"] == "9.9.9-test" != __version__
    stamp = datetime.fromisoformat(body["timestamp"])
    assert stamp.tzinfo is not None
    assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=1)
    # Bounded by the probe's own timeout, not the connect retries of the request path.
    assert elapsed < 2.0
    # Nothing of the driver's error text reaches the client.
    for leak in ("Connect", "refused", "127.0.0.1", "Errno"):
        assert leak not in response.text
