"""The engine's protections, on a real PostgreSQL: statement timeout, bounded connect retries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError, InvalidRequestError

from service.db import Database, engine_options
from service.errors import ServiceUnavailableError
from service.settings import Settings
from testkit import free_port


async def test_statement_timeout_cancels_a_runaway_query_and_keeps_the_pool_usable(
    make_settings: Callable[..., Settings],
) -> None:
    database = Database(make_settings(database_statement_timeout_ms=200, sqlalchemy_pool_size=1))
    try:
        started = time.monotonic()
        with pytest.raises(DBAPIError) as error:
            async for session in database.session():
                await session.execute(text("SELECT pg_sleep(5)"))
        assert time.monotonic() - started < 2
        assert "QueryCanceled" in type(error.value.orig).__name__ or "canceling statement" in str(
            error.value.orig
        )
        # The single pooled connection is healthy again.
        async for session in database.session():
            assert (await session.execute(text("SELECT 1"))).scalar() == 1
    finally:
        await database.dispose()


async def test_statement_timeout_is_set_on_the_server_in_direct_mode(
    make_settings: Callable[..., Settings],
) -> None:
    database = Database(make_settings(database_statement_timeout_ms=1234))
    try:
        async for session in database.session():
            shown = (await session.execute(text("SHOW statement_timeout"))).scalar()
        assert shown == "1234ms"
    finally:
        await database.dispose()


def test_pgbouncer_mode_disables_every_prepared_statement_cache() -> None:
    settings = Settings(
        database_url="postgresql://u:p@h/app", database_pool_mode="pgbouncer-transaction"
    )
    connect_args = engine_options(settings, application_name="x")["connect_args"]
    assert connect_args["statement_cache_size"] == 0
    assert connect_args["prepared_statement_cache_size"] == 0
    names = {connect_args["prepared_statement_name_func"]() for _ in range(100)}
    assert len(names) == 100
    # PgBouncer < 1.20 rejects unknown startup parameters, so the timeout is not sent as one.
    assert "statement_timeout" not in connect_args["server_settings"]
    assert connect_args["command_timeout"] == pytest.approx(6.0)


def test_pgbouncer_prepared_mode_keeps_the_caches_but_sends_no_timeout_parameters() -> None:
    settings = Settings(
        database_url="postgresql://u:p@h/app",
        database_pool_mode="pgbouncer-prepared",
        database_idle_in_transaction_timeout_ms=10_000,
    )
    connect_args = engine_options(settings, application_name="x")["connect_args"]
    # asyncpg's and SQLAlchemy's defaults: PgBouncer re-prepares on whichever server runs them.
    assert not {"statement_cache_size", "prepared_statement_cache_size"} & set(connect_args)
    assert "prepared_statement_name_func" not in connect_args
    # PgBouncer refuses startup parameters it does not track: these live on the role.
    assert set(connect_args["server_settings"]) == {"application_name"}
    assert connect_args["command_timeout"] == pytest.approx(6.0)
    assert Database(settings).reads_in_autocommit


@pytest.mark.parametrize("unit", ["session", "transaction"])
async def test_unreachable_database_fails_fast_with_503_after_bounded_retries(unit: str) -> None:
    """Both ways to a transaction (the ORM session of the key admin, the request path's driver
    connection) answer 503; a connection that never started has nothing to give back."""
    retries: list[int] = []
    settings = Settings(
        database_url=f"postgresql://u:p@127.0.0.1:{free_port()}/app",
        database_connect_timeout=1.5,
        database_connect_retry_attempts=3,
    )
    database = Database(settings, on_connect_retry=lambda: retries.append(1))
    try:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError):
            if unit == "session":
                async for _session in database.session():
                    pytest.fail("no connection can be had")
            else:
                async with database.transaction():
                    pytest.fail("no connection can be had")
        elapsed = time.monotonic() - started
    finally:
        await database.dispose()
    assert elapsed < settings.database_connect_timeout + 0.5
    assert len(retries) == 2  # three attempts: two of them retries


async def test_read_sessions_in_direct_mode_autocommit_and_refuse_writes(
    make_settings: Callable[..., Settings],
) -> None:
    """One SELECT needs no BEGIN/COMMIT around it (two round trips saved per read); a write in
    a read session is refused before it is sent, since autocommit would commit it at once."""
    database = Database(make_settings())
    try:
        async for session in database.session(read_only=True):
            # No transaction block: each statement is its own (txid changes between them).
            first = (await session.execute(select(func.txid_current_if_assigned()))).scalar()
            now_a = (await session.execute(select(func.statement_timestamp()))).scalar()
            now_b = (await session.execute(select(func.transaction_timestamp()))).scalar()
            assert first is None
            assert now_a is not None
            assert now_b is not None
            assert now_b > now_a
        async for session in database.session():
            assert (await session.execute(text("SHOW transaction_read_only"))).scalar() == "off"
        for statement in (text("CREATE TABLE should_fail (x int)"), text("SELECT 1")):
            with pytest.raises(InvalidRequestError, match="not a SELECT"):
                async for session in database.session(read_only=True):
                    await session.execute(statement)
        async for session in database.session():
            exists = await session.execute(text("SELECT to_regclass('should_fail')"))
            assert exists.scalar() is None
    finally:
        await database.dispose()


async def test_read_sessions_behind_pgbouncer_run_begin_read_only(
    make_settings: Callable[..., Settings],
) -> None:
    # Outside a transaction PgBouncer (< 1.21) may run a statement's prepare and execute on two
    # server connections, so in this mode reads keep their read-only transaction.
    database = Database(make_settings(database_pool_mode="pgbouncer-transaction"))
    try:
        async for session in database.session(read_only=True):
            result = await session.execute(select(func.current_setting("transaction_read_only")))
            assert result.scalar() == "on"
    finally:
        await database.dispose()


async def test_a_connection_the_server_closed_is_replaced_at_checkout(
    make_settings: Callable[..., Settings],
) -> None:
    """No pre-ping round trip, yet a pooled connection killed on the server side (a restart, a
    failover, PgBouncer going away) never reaches a request."""
    database = Database(make_settings(sqlalchemy_pool_size=1, sqlalchemy_pool_pre_ping=False))
    try:
        async for session in database.session():
            victim = (await session.execute(text("SELECT pg_backend_pid()"))).scalar()
        async for session in database.session():
            assert (await session.execute(text("SELECT pg_backend_pid()"))).scalar() == victim
        killer = Database(make_settings(sqlalchemy_pool_size=1))
        try:
            async for session in killer.session():
                await session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": victim})
        finally:
            await killer.dispose()
        # asyncpg notices the closed socket as soon as the event loop runs.
        await asyncio.sleep(0.2)
        async for session in database.session(read_only=True):
            replaced = (await session.execute(select(func.pg_backend_pid()))).scalar()
        assert replaced != victim
    finally:
        await database.dispose()
