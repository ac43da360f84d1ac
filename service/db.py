"""Engines, sessions and the connection retry policy.

Built by the app factory's lifespan and kept on its state; nothing here connects at import.

Two pool modes:

``direct``
    The app talks to PostgreSQL. ``statement_timeout`` is sent as a startup parameter, so the
    server itself kills a runaway query and frees the pooled connection.

``pgbouncer-transaction``
    The app talks to PgBouncer in transaction pooling mode, where consecutive transactions of one
    client may run on different server connections. Named prepared statements would leak between
    clients, so asyncpg's statement cache and SQLAlchemy's prepared-statement cache are off and
    every statement gets a unique name. PgBouncer before 1.20 rejects unknown startup parameters,
    so ``statement_timeout`` cannot travel that way: set it on the database role
    (``ALTER ROLE app SET statement_timeout = '5s'``) and the client-side ``command_timeout``
    below still cancels a runaway query.

Round trips are the cost of a request here (the profile of ``GET /v1/tasks/{id}`` found six
per request: SQLAlchemy's pre-ping ``BEGIN; ; ROLLBACK``, then ``BEGIN READ ONLY``, the SELECT
and ``COMMIT``), so the hot path spends as few as it safely can:

- A connection the server closed (restart, failover, PgBouncer restart) is detected at checkout
  for free, from the driver's own state; SQLAlchemy's round-trip ping is opt-in
  (``SQLALCHEMY_POOL_PRE_PING``) for networks that drop idle connections silently.
- Reads in ``direct`` mode run in autocommit: a single SELECT is its own snapshot, so
  ``BEGIN``/``COMMIT`` around it buy nothing; the read-only guarantee is kept client-side (a
  read session refuses anything but SELECT). Behind PgBouncer reads keep ``BEGIN READ ONLY``:
  outside a transaction, the prepare and the execute of one statement may land on different
  server connections (PgBouncer < 1.21).
- The retry machinery is entered only once a first attempt to connect has failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import uuid4

import stamina
from fastapi import Depends, Request
from sqlalchemy import event, exc
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import ORMExecuteState, Session

from service.errors import ServiceUnavailableError, is_connection_error
from service.settings import Settings


def _unique_statement_name() -> str:
    return f"__asyncpg_{uuid4().hex}__"


def engine_options(settings: Settings, *, application_name: str) -> dict[str, Any]:
    """Keyword arguments for ``create_async_engine`` derived from settings."""
    timeout_s = settings.database_statement_timeout_ms / 1000
    connect_args: dict[str, Any] = {"timeout": settings.database_connect_timeout}
    server_settings = {"application_name": application_name}
    if timeout_s:
        # Client-side backstop a little after the server's own timeout, so the server's clean
        # error normally wins and the client only steps in when the server cannot.
        connect_args["command_timeout"] = timeout_s + 1
    if settings.database_pool_mode == "pgbouncer-transaction":
        connect_args |= {
            "statement_cache_size": 0,
            "prepared_statement_cache_size": 0,
            "prepared_statement_name_func": _unique_statement_name,
        }
    elif timeout_s:
        server_settings["statement_timeout"] = str(settings.database_statement_timeout_ms)
    connect_args["server_settings"] = server_settings
    return {
        "pool_size": settings.sqlalchemy_pool_size,
        "max_overflow": settings.sqlalchemy_pool_overflow,
        "pool_timeout": settings.sqlalchemy_pool_timeout,
        "pool_recycle": settings.sqlalchemy_pool_recycle,
        "pool_pre_ping": settings.sqlalchemy_pool_pre_ping,
        "echo": settings.sqlalchemy_echo,
        "connect_args": connect_args,
    }


def _discard_closed_connections(engine: AsyncEngine) -> None:
    """At checkout, hand out no connection the server has already closed (no round trip).

    asyncpg notices the server closing a connection (its socket is always being read) and
    marks it closed; raising DisconnectionError makes the pool drop it and check out another,
    or open a new one.
    """

    @event.listens_for(engine.sync_engine, "checkout")
    def check(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        driver = getattr(dbapi_connection, "driver_connection", None)
        if driver is not None and driver.is_closed():
            raise exc.DisconnectionError("connection closed by the server")


def _drop_connections_that_timed_out(engine: AsyncEngine) -> None:
    """A statement that hit the client-side timeout leaves its connection unusable: drop it.

    asyncpg answers the timeout by sending a cancel request, and every later operation on that
    connection (the session's ROLLBACK, the pool's reset on return) first waits for the server
    to acknowledge the cancelled statement. From a peer that vanished without a FIN (a
    blackholed PostgreSQL or PgBouncer host) that never comes: in the failure lab a request
    hung 28-35 s, until nginx gave up. Marked as a disconnect, the connection is invalidated
    (closed, never pooled again) instead; the rest of the pool is left alone, since a slow
    statement on a healthy server is not an outage.
    """

    @event.listens_for(engine.sync_engine, "handle_error")
    def on_error(context: Any) -> None:
        original = context.original_exception
        cause = getattr(original, "__cause__", None)
        if isinstance(original, TimeoutError) or isinstance(cause, TimeoutError):
            context.is_disconnect = True
            context.invalidate_pool_on_disconnect = False


def create_engine(settings: Settings, url: str, *, role: str = "primary") -> AsyncEngine:
    engine = create_async_engine(
        url, **engine_options(settings, application_name=f"{settings.app_name}-{role}")
    )
    _discard_closed_connections(engine)
    _drop_connections_that_timed_out(engine)
    return engine


class ReadOnlySession(Session):
    """The session class of read sessions: anything but a SELECT is refused before it is sent.

    In autocommit (direct mode) nothing else would stop a write from committing at once on the
    primary; with a replica configured the replica would refuse it, but only in production.
    """


@event.listens_for(ReadOnlySession, "do_orm_execute")
def _refuse_writes(state: ORMExecuteState) -> None:
    if not state.is_select:
        raise exc.InvalidRequestError("a read-only session ran a statement that is not a SELECT")


@dataclass(frozen=True)
class PoolStatus:
    size: int
    checked_out: int
    overflow: int


class Database:
    """The primary engine, an optional read-replica engine, and their session factories."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_connect_retry: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.engine = create_engine(settings, settings.require_database_url(), role="primary")
        self.read_engine = (
            create_engine(settings, settings.database_read_url.get_secret_value(), role="replica")
            if settings.database_read_url is not None
            else self.engine
        )
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        # Autocommit shares the engine's pool: the option only changes what a checkout emits.
        self.reads_in_autocommit = settings.database_pool_mode == "direct"
        read_bind = (
            self.read_engine.execution_options(isolation_level="AUTOCOMMIT")
            if self.reads_in_autocommit
            else self.read_engine
        )
        self.read_sessionmaker = async_sessionmaker(
            read_bind, expire_on_commit=False, sync_session_class=ReadOnlySession
        )
        self._on_connect_retry = on_connect_retry

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()

    def pool_status(self) -> PoolStatus:
        pool: Any = self.engine.pool
        return PoolStatus(
            size=pool.size(), checked_out=pool.checkedout(), overflow=max(pool.overflow(), 0)
        )

    async def connect_session(self, session: AsyncSession, *, read_only: bool = False) -> None:
        """Give ``session`` a connection, retrying transient failures to obtain one.

        Only acquiring the connection is retried: no statement has been sent yet, so a retry can
        never run anything twice. The whole acquisition, retries included, is bounded by
        DATABASE_CONNECT_TIMEOUT so a request fails fast with 503 instead of queueing on a pool
        that cannot connect.
        """
        settings = self.settings
        # BEGIN READ ONLY (behind PgBouncer) makes a read that tries to write fail loudly on the
        # primary too; in autocommit the session class refuses it instead.
        options = (
            {"postgresql_readonly": True} if read_only and not self.reads_in_autocommit else None
        )
        try:
            async with asyncio.timeout(settings.database_connect_timeout):
                try:
                    await self._acquire(session, options)
                    return
                except Exception as exc:
                    if not is_connection_error(exc) or settings.database_connect_retry_attempts < 2:
                        raise
                # The first attempt failed to connect: now (and only now) the retry policy.
                async for attempt in stamina.retry_context(
                    on=is_connection_error,
                    attempts=settings.database_connect_retry_attempts - 1,
                    timeout=settings.database_connect_timeout,
                    wait_initial=0.05,
                    wait_max=0.5,
                ):
                    with attempt:
                        if self._on_connect_retry is not None:
                            self._on_connect_retry()
                        await self._acquire(session, options)
        except Exception as exc:
            if is_connection_error(exc):
                raise ServiceUnavailableError(
                    "The database is unavailable; retry shortly", retry_after=2
                ) from None
            raise

    async def _acquire(self, session: AsyncSession, options: dict[str, Any] | None) -> None:
        try:
            await session.connection(execution_options=options)
        except BaseException:
            await self.rollback_or_discard(session)
            raise

    async def rollback_or_discard(self, session: AsyncSession) -> None:
        """Roll back, or, when the link is gone, drop the connection without waiting for it.

        After a statement timed out on a connection whose peer vanished without a FIN (a
        blackholed database or PgBouncer host), asyncpg's ROLLBACK first waits for the
        cancelled statement to be acknowledged, which never happens: the request hung until
        a proxy's own timeout (measured in the failure lab: 35 s, nginx's 504). The rollback
        gets DATABASE_CONNECT_TIMEOUT; past that the connection is invalidated (its socket
        closed at once, never returned to the pool) and the request answers its 503.
        """
        try:
            async with asyncio.timeout(self.settings.database_connect_timeout):
                await session.rollback()
        except Exception:
            await session.invalidate()

    async def session(self, *, read_only: bool = False) -> AsyncIterator[AsyncSession]:
        """One transaction: committed when the caller finishes, rolled back when it raises."""
        maker = self.read_sessionmaker if read_only else self.sessionmaker
        async with maker() as session:
            await self.connect_session(session, read_only=read_only)
            try:
                yield session
            except BaseException:
                await self.rollback_or_discard(session)
                raise
            try:
                await session.commit()
            except BaseException:
                await self.rollback_or_discard(session)
                raise


def get_database(request: Request) -> Database:
    database: Database = request.state.database
    return database


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """FastAPI dependency: the request's read-write transaction on the primary."""
    async for session in get_database(request).session():
        yield session


async def get_read_session(request: Request) -> AsyncIterator[AsyncSession]:
    """FastAPI dependency: a read-only transaction, on the replica when one is configured."""
    async for session in get_database(request).session(read_only=True):
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
"""Read-write session; ``scope="function"`` commits before the response is sent, so a 2xx is
only ever returned for a write that is durable."""

ReadSessionDep = Annotated[AsyncSession, Depends(get_read_session, scope="function")]
