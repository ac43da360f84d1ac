"""Engines, sessions and the connection retry policy.

Built by the app factory's lifespan and kept on its state; nothing here connects at import.

Two pool modes:

``direct``
    The app talks to PostgreSQL. ``statement_timeout`` is sent as a startup parameter, so the
    server itself kills a runaway query and frees the pooled connection.

``pgbouncer-prepared``
    The app talks to PgBouncer (>= 1.21, ``max_prepared_statements`` > 0) in transaction pooling
    mode, where consecutive transactions of one client may run on different server connections.
    PgBouncer tracks each client's protocol-level prepared statements and prepares them on
    whichever server connection runs them, so the statement caches stay on and a read is one
    round trip, as in direct mode. Startup parameters are as in ``pgbouncer-transaction``.

``pgbouncer-transaction``
    The same without that tracking (PgBouncer < 1.21, or ``max_prepared_statements = 0``).
    Named prepared statements would leak between clients, so asyncpg's statement cache and
    SQLAlchemy's prepared-statement cache are off and every statement gets a unique name.

    Behind PgBouncer (either mode) ``statement_timeout`` is not sent as a startup parameter
    (PgBouncer refuses parameters it does not track): set it on the database role
    (``ALTER ROLE app SET statement_timeout = '5s'``); the client-side ``command_timeout`` below
    still cancels a runaway query.

Round trips are the cost of a request here (the profile of ``GET /v1/tasks/{id}`` found six
per request: SQLAlchemy's pre-ping ``BEGIN; ; ROLLBACK``, then ``BEGIN READ ONLY``, the SELECT
and ``COMMIT``), so the hot path spends as few as it safely can:

- A connection the server closed (restart, failover, PgBouncer restart) is detected at checkout
  for free, from the driver's own state; SQLAlchemy's round-trip ping is opt-in
  (``SQLALCHEMY_POOL_PRE_PING``) for networks that drop idle connections silently.
- Reads run in autocommit: a single SELECT is its own snapshot, so ``BEGIN``/``COMMIT``
  around it buy nothing; the read-only guarantee is kept client-side (a read session refuses
  anything but SELECT). In ``pgbouncer-transaction`` mode reads keep ``BEGIN READ ONLY``:
  outside a transaction, the prepare and the execute of one statement may land on different
  server connections, which only a PgBouncer that tracks prepared statements handles.
- The retry machinery is entered only once a first attempt to connect has failed.

With a read replica (``DATABASE_READ_URL``), reads go through ``Database.read``: the replica
when ``ReplicaMonitor`` (service/replica.py) says it is caught up enough, else the primary, and
the primary again when the replica fails mid-read. Writes then end with one more statement,
``pg_current_wal_insert_lsn()``: the consistency token that lets the same client's next read
see its write on any instance (docs/read-replica.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import uuid4

import asyncpg
import stamina
import structlog
from sqlalchemy import event, exc, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import ORMExecuteState, Session
from sqlalchemy.sql import ClauseElement
from sqlalchemy.util import greenlet_spawn

from service import deadline
from service.dbsocket import apply_keepalive
from service.dbtls import asyncpg_ssl
from service.errors import (
    CommitOutcomeUnknownError,
    DomainError,
    ServiceUnavailableError,
    answered_by_server,
    is_connection_error,
)
from service.replica import (
    TOKEN_CHECK_SQL,
    ReplicaMonitor,
    ReplicaStatus,
    Route,
    parse_lsn,
)
from service.settings import Settings
from service.write_connection import DRIVER_DIALECT, CompiledStatements, WriteConnection

T = TypeVar("T")
Transaction = WriteConnection | AsyncSession
"""What runs a transaction's Core statements: the request path's driver connection
(``Database.transaction``), or a session (the key administration, scripts, tests)."""
log = structlog.get_logger("service.db")

# Taken after the commit: the insert position is at or past the end of the commit record, so a
# replica that has replayed it shows the write (the flush position would not be, with
# synchronous_commit = off).
WRITE_POSITION_SQL = text("SELECT pg_current_wal_insert_lsn()::text")
SERIALIZATION_FAILURE = "40001"  # also "canceling statement due to conflict with recovery"


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
    if not settings.behind_pgbouncer:
        # Behind PgBouncer these cannot travel as startup parameters: they go on the role.
        if timeout_s:
            server_settings["statement_timeout"] = str(settings.database_statement_timeout_ms)
        if idle_ms := settings.database_idle_in_transaction_timeout_ms:
            server_settings["idle_in_transaction_session_timeout"] = str(idle_ms)
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


def _abort_invalidated_connections(engine: AsyncEngine) -> None:
    """An invalidated connection is unusable: close its socket at once, not gracefully.

    SQLAlchemy closes an invalidated asyncpg connection politely first (a Terminate message,
    up to 2 s for it to be sent and acknowledged). On a vanished or slow peer that is 2 s of
    the request's time spent on a connection nobody will use again: measured in the failure
    lab's slow-database scenario, a request past its deadline answered at 17 s instead of 15.
    The server (or PgBouncer) sees the socket close and ends the session and its transaction.
    """

    @event.listens_for(engine.sync_engine, "invalidate")
    def on_invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
        driver = getattr(dbapi_connection, "driver_connection", None)
        if driver is not None and not driver.is_closed():
            driver.terminate()


def create_engine(settings: Settings, url: str, *, role: str = "primary") -> AsyncEngine:
    options = engine_options(settings, application_name=f"{settings.app_name}-{role}")
    url, tls = asyncpg_ssl(url, settings.tls_files())
    if tls is not None:
        options["connect_args"]["ssl"] = tls
    engine = create_async_engine(url, **options)
    _discard_closed_connections(engine)
    _drop_connections_that_timed_out(engine)
    _abort_invalidated_connections(engine)
    apply_keepalive(engine, settings)
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


@dataclass(frozen=True, slots=True)
class DriverQuery:
    """A SELECT compiled once for the driver: its SQL text and the order of its parameters.

    The read path runs these on the asyncpg connection itself: no ORM session, no per-request
    statement building or cache-key computation, one row-to-record step. The statement is still
    written with SQLAlchemy Core (columns, types, casts), compiled by the same dialect the
    engine uses, so the text is exactly what SQLAlchemy would have sent.
    """

    sql: str
    names: tuple[str, ...]

    @classmethod
    def compile(cls, statement: ClauseElement) -> DriverQuery:
        compiled: Any = statement.compile(dialect=DRIVER_DIALECT)
        sql = compiled.string.lstrip()
        if not sql.upper().startswith(("SELECT", "WITH", "(SELECT")):
            raise ValueError("a DriverQuery is for reads: SELECT only")
        return cls(sql, tuple(compiled.positiontup or ()))

    def arguments(self, values: Mapping[str, Any]) -> list[Any]:
        return [values[name] for name in self.names]


class ReadConnection:
    """The driver connection a read runs on, lent for the duration of ``Database.read``.

    Only ``DriverQuery`` objects run here, and they can only be SELECTs (checked when compiled),
    which keeps the read-only guarantee of the read path without a transaction around it.
    """

    __slots__ = ("_driver", "_on_query")

    def __init__(self, driver: Any, on_query: Callable[[float], None] | None) -> None:
        self._driver = driver
        self._on_query = on_query

    async def fetch(self, query: DriverQuery, values: Mapping[str, Any]) -> Sequence[Any]:
        started = time.perf_counter()
        rows: Sequence[Any] = await self._driver.fetch(query.sql, *query.arguments(values))
        if self._on_query is not None:
            self._on_query(time.perf_counter() - started)
        return rows

    async def fetchrow(self, query: DriverQuery, values: Mapping[str, Any]) -> Any:
        rows = await self.fetch(query, values)
        return rows[0] if rows else None

    async def fetchval(self, sql: str) -> Any:
        return await self._driver.fetchval(sql)


class ReplicaBehindError(Exception):
    """The replica has not replayed the position a read's consistency token names."""


def _replica_failed(error: BaseException) -> bool:
    """A failure of the replica itself, after which the same read on the primary is right."""
    if isinstance(error, ServiceUnavailableError) or is_connection_error(error):
        return True
    orig = getattr(error, "orig", error)  # SQLAlchemy wraps the driver's error; the driver not
    if isinstance(orig, asyncpg.InterfaceError | asyncpg.exceptions.InternalClientError):
        # The driver lost track of the connection (its server went away mid-read).
        return True
    return getattr(orig, "sqlstate", None) == SERIALIZATION_FAILURE


def _server_answered(error: BaseException) -> bool:
    """Did ``error`` come from the server (so the statement's outcome is known: it failed)?"""
    orig = getattr(error, "orig", None) or error  # SQLAlchemy wraps the driver's error
    return answered_by_server(orig.__cause__ or orig)  # and its asyncpg adapter wraps asyncpg's


def _connection_still_usable(error: BaseException) -> bool:
    """After ``error`` on a read, may the connection go back to the pool? Only when the server
    answered (an error it reported) or the read itself decided (a domain error): anything else
    (a lost link, a client-side timeout, a cancelled read) leaves its state unknown."""
    if isinstance(error, DomainError | ReplicaBehindError):
        return True
    return answered_by_server(error)


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
        on_read_routed: Callable[[str, str], None] | None = None,
        on_replica_status: Callable[[ReplicaStatus], None] | None = None,
        on_query: Callable[[float], None] | None = None,
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
        self.reads_in_autocommit = settings.database_pool_mode != "pgbouncer-transaction"
        # Read sessions (``session(read_only=True)``) for callers that want the ORM; the request
        # path reads through ``read()`` instead.
        self.read_sessionmaker = async_sessionmaker(
            self._read_bind(self.read_engine),
            expire_on_commit=False,
            sync_session_class=ReadOnlySession,
        )
        self.replica: ReplicaMonitor | None = None
        if self.read_engine is not self.engine:
            self.replica = ReplicaMonitor(
                self.engine,
                self.read_engine,
                max_lag_seconds=settings.database_read_max_lag_seconds,
                poll_seconds=settings.database_read_lag_poll_seconds,
                query_timeout=settings.database_connect_timeout,
                autocommit=self.reads_in_autocommit,
                on_status=on_replica_status,
            )
        # Where a write's token is read: one round trip in autocommit (direct mode).
        self._position_bind = (
            self.engine.execution_options(isolation_level="AUTOCOMMIT")
            if self.reads_in_autocommit
            else self.engine
        )
        self._on_connect_retry = on_connect_retry
        self._on_read_routed = on_read_routed
        # Reads and the request path's writes run on the driver connection (``ReadConnection``,
        # ``WriteConnection``): the engine's events do not see those statements, so their
        # duration is reported through this callback instead.
        self._on_query = on_query
        self._primary_read_bind = self._read_bind(self.engine)
        self._replica_read_bind = (
            self._read_bind(self.read_engine)
            if self.read_engine is not self.engine
            else self._primary_read_bind
        )
        self._reported_tls_failures: set[str] = set()
        # The request path's write statements, compiled for the driver once each.
        self._statements = CompiledStatements()

    def _read_bind(self, engine: AsyncEngine) -> AsyncEngine:
        return (
            engine.execution_options(isolation_level="AUTOCOMMIT")
            if self.reads_in_autocommit
            else engine
        )

    async def start(self) -> None:
        """Start tracking the replica (a background poll); nothing to do without one."""
        if self.replica is not None:
            self.replica.start()

    def report_tls_failure(self, reason: str) -> None:
        """Log a TLS failure once per distinct reason, not on every probe (one clear line)."""
        if reason not in self._reported_tls_failures:
            self._reported_tls_failures.add(reason)
            log.error("database_tls_failed", reason=reason)

    async def dispose(self) -> None:
        if self.replica is not None:
            await self.replica.stop()
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
        # BEGIN READ ONLY (pgbouncer-transaction mode) makes a read that tries to write fail
        # loudly on the primary too; in autocommit the session class refuses it instead.
        options = (
            {"postgresql_readonly": True} if read_only and not self.reads_in_autocommit else None
        )
        await self._connect_retrying(lambda: self._acquire(session, options))

    async def _connect_retrying(self, acquire: Callable[[], Awaitable[None]]) -> None:
        """Run ``acquire`` (obtain a connection), retrying connection failures, bounded in time."""
        settings = self.settings
        try:
            async with asyncio.timeout(settings.database_connect_timeout):
                try:
                    await acquire()
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
                        await acquire()
        except Exception as exc:
            if is_connection_error(exc):
                raise ServiceUnavailableError(
                    "The database is unavailable; retry shortly", retry_after=2
                ) from None
            raise

    async def _acquire(self, session: AsyncSession, options: dict[str, Any] | None) -> None:
        try:
            await session.connection(execution_options=options)
        except BaseException as error:
            await self.rollback_or_discard(session, error)
            raise

    # --- reads that may go to the replica ------------------------------------------------------
    async def read(
        self, work: Callable[[ReadConnection], Awaitable[T]], *, token: int | None = None
    ) -> T:
        """Run ``work`` (SELECTs only) on the replica when it may serve it, else the primary.

        ``work`` gets a ``ReadConnection``: the pooled driver connection itself, no ORM session
        and, in direct mode, no transaction around a read (one statement is its own snapshot).

        ``token`` is the WAL position of the caller's last write (its consistency token): the
        replica serves the read only once it has replayed that far. Deciding costs no query
        unless the token is newer than the monitor's last poll; then one, on the replica
        connection the read then uses. A replica that fails (refuses, drops the connection,
        cancels the read for a recovery conflict) costs the caller nothing: the read runs again
        on the primary, and the replica gets no more reads until a poll finds it well.
        """
        replica = self.replica
        if replica is None:
            async with self._reader(self._primary_read_bind, retry=True) as connection:
                return await work(connection)
        route = replica.route(token)
        if route is Route.PRIMARY:
            self._routed("primary", replica.state.value)
            async with self._reader(self._primary_read_bind, retry=True) as connection:
                return await work(connection)
        served = "checked" if route is Route.CHECK else "caught-up"
        try:
            result = await self._read_on_replica(work, token if route is Route.CHECK else None)
        except ReplicaBehindError:
            self._routed("primary", "behind-token")
        except Exception as error:
            if not _replica_failed(error):
                self._routed("replica", served)  # e.g. a 404: answered by the replica
                raise
            replica.mark_unavailable()
            self._routed("primary", "replica-failed")
        else:
            self._routed("replica", served)
            return result
        async with self._reader(self._primary_read_bind, retry=True) as connection:
            return await work(connection)

    def _routed(self, target: str, reason: str) -> None:
        if self._on_read_routed is not None:
            self._on_read_routed(target, reason)

    @asynccontextmanager
    async def _reader(self, bind: AsyncEngine, *, retry: bool) -> AsyncIterator[ReadConnection]:
        """A pooled connection of ``bind`` lent as a ``ReadConnection``.

        Checked out of SQLAlchemy's pool itself (its size, gauges, connect hooks and the
        check-out test for connections the server closed all apply) without the engine's
        ``Connection`` around it: a read sends its statement to the driver, so that layer's
        set-up and tear-down were a sixth of a read's CPU for nothing.
        In pgbouncer-transaction mode a read keeps ``BEGIN READ ONLY``: outside a transaction
        the prepare and the execute of one statement may land on different server connections.
        """
        pool = bind.sync_engine.pool
        pooled: Any = None

        async def acquire() -> None:
            nonlocal pooled
            # A new connection is awaited inside the pool: SQLAlchemy's greenlet bridge.
            pooled = await greenlet_spawn(pool.connect)

        if retry:
            await self._connect_retrying(acquire)
        else:
            # One attempt, no retries: the primary is the fallback, and it is waiting.
            async with asyncio.timeout(self.settings.database_connect_timeout):
                await acquire()
        usable = True
        try:
            driver: Any = pooled.driver_connection
            reader = ReadConnection(driver, self._on_query)
            if self.reads_in_autocommit:
                yield reader
            else:
                transaction = driver.transaction(readonly=True)
                try:
                    await transaction.start()
                except BaseException:
                    # asyncpg keeps a transaction that failed to begin as the connection's
                    # current one (every later one there would be a SAVEPOINT): discard it.
                    usable = False
                    raise
                try:
                    yield reader
                except BaseException as error:
                    # No ROLLBACK on a connection whose state is unknown: after a client-side
                    # timeout on a vanished peer it would wait for an answer that never comes
                    # (the failure lab's blackholed database). That connection is invalidated
                    # below instead; a usable one gets a bounded rollback.
                    if _connection_still_usable(error):
                        async with asyncio.timeout(self.settings.database_connect_timeout):
                            await transaction.rollback()
                    raise
                await transaction.commit()
        except BaseException as error:
            usable = usable and _connection_still_usable(error)
            raise
        finally:
            if usable:
                await greenlet_spawn(pooled.close)
            else:
                # Closed, never returned to the pool: the next read gets a fresh connection.
                await greenlet_spawn(pooled.invalidate)

    async def _read_on_replica(
        self, work: Callable[[ReadConnection], Awaitable[T]], token: int | None
    ) -> T:
        async with self._reader(self._replica_read_bind, retry=False) as connection:
            if token is not None:
                replayed = parse_lsn(await connection.fetchval(TOKEN_CHECK_SQL.text))
                if replayed < token:
                    raise ReplicaBehindError
                assert self.replica is not None
                self.replica.replayed(replayed)
            return await work(connection)

    # --- writes -------------------------------------------------------------------------------
    async def commit(self, session: Transaction) -> str | None:
        """Commit ``session``; with a replica, return the consistency token of the write.

        The token is the primary's WAL position after the commit. It costs one statement, and
        only when a replica is configured (without one every read is on the primary anyway).
        If that statement fails the write still stands: the response goes out without a token
        rather than as an error that would invite a retry of a committed write.
        """
        await self._commit(session)
        if self.replica is None:
            return None
        try:
            async with (
                asyncio.timeout(self.settings.database_connect_timeout),
                self._position_bind.connect() as connection,
            ):
                value = await connection.scalar(WRITE_POSITION_SQL)
        except Exception as error:
            if not is_connection_error(error):
                raise
            log.warning("consistency_token_unavailable")
            return None
        return value if isinstance(value, str) else None

    @staticmethod
    async def _commit(session: Transaction) -> None:
        """COMMIT, telling the request deadline once it is on its way (service/deadline.py):
        from then on an abandoned request may have been applied."""
        if not session.in_transaction():
            await session.commit()
            return
        if isinstance(session, AsyncSession):
            await session.flush()  # the INSERTs and UPDATEs: before this, nothing is applied
        deadline.commit_sending()
        try:
            await session.commit()
        except Exception as error:
            if _server_answered(error):
                raise  # the server refused the COMMIT: nothing was applied
            raise CommitOutcomeUnknownError from error

    async def rollback_or_discard(
        self, session: Transaction, error: BaseException | None = None
    ) -> None:
        """Roll back, or, when the link is gone, drop the connection without waiting for it.

        After a statement timed out on a connection whose peer vanished without a FIN (a
        blackholed database or PgBouncer host), asyncpg's ROLLBACK first waits for the
        cancelled statement to be acknowledged, which never happens: the request hung until
        a proxy's own timeout (measured in the failure lab: 35 s, nginx's 504). The rollback
        gets DATABASE_CONNECT_TIMEOUT; past that the connection is invalidated (its socket
        closed at once, never returned to the pool) and the request answers its 503.

        A cancelled request (its deadline, service/middleware/deadline.py; a client gone), or a
        COMMIT that got no answer, is not rolled back at all: the statement it was waiting on
        is in an unknown state on the server and on PgBouncer, and asyncpg's ROLLBACK would
        first wait for that statement's cancellation to be acknowledged. The connection is
        invalidated instead; closing it ends the transaction on the server (PgBouncer closes
        its server connection when a client leaves mid-transaction), so nothing uncommitted
        is applied. The request path's ``WriteConnection`` knows more: whenever the driver
        failed without the server's answer, or a ``BEGIN`` did not complete, it is discarded
        the same way, as a read's connection is (``_reader``).
        """
        if error is not None and (
            not isinstance(error, Exception)
            or isinstance(error, CommitOutcomeUnknownError)
            or (isinstance(session, WriteConnection) and session.state_unknown)
        ):
            await session.invalidate()
            return
        try:
            async with asyncio.timeout(self.settings.database_connect_timeout):
                await session.rollback()
        except Exception:
            await session.invalidate()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[WriteConnection]:
        """One read-write transaction on a pooled driver connection: the request path's writes
        (service/write_connection.py says why not through an engine ``Connection``).

        The connection comes out of the engine's pool as a read's does (``_reader``), with the
        same retries; committing and the failure handling are the sessions' own (``_settled``).
        A context manager, not a generator to iterate: an error in the block (a cancelled
        request included) reaches ``_settled`` in the same task, before the response goes out,
        where a generator left mid-iteration would be closed later by the garbage collector.
        """
        pool = self.engine.sync_engine.pool
        pooled: Any = None

        async def acquire() -> None:
            nonlocal pooled
            pooled = await greenlet_spawn(pool.connect)

        await self._connect_retrying(acquire)
        connection = WriteConnection(pooled, self._statements, self._on_query)
        try:
            async with self._settled(connection):
                yield connection
        finally:
            await connection.release()

    async def session(self, *, read_only: bool = False) -> AsyncIterator[AsyncSession]:
        """One transaction: committed when the caller finishes, rolled back when it raises."""
        maker = self.read_sessionmaker if read_only else self.sessionmaker
        async with maker() as session:
            await self.connect_session(session, read_only=read_only)
            async with self._settled(session):
                yield session

    @asynccontextmanager
    async def _settled(self, unit: Transaction) -> AsyncIterator[None]:
        """Commit ``unit`` once the block is done; when the block or the COMMIT fails, roll it
        back or discard its connection (``rollback_or_discard``) and re-raise."""
        try:
            yield
            await self._commit(unit)
        except BaseException as error:
            await self.rollback_or_discard(unit, error)
            raise


@dataclass(frozen=True)
class Reads:
    """A request's way to read: ``await reads.run(work)`` (see ``Database.read``)."""

    database: Database
    token: int | None

    async def run(self, work: Callable[[ReadConnection], Awaitable[T]]) -> T:
        return await self.database.read(work, token=self.token)
