"""The request path's write transaction, run on the driver connection (``Database.transaction``).

The writes are prebuilt SQLAlchemy Core statements (module constants, or built once per shape
and memoized). Run through an engine ``Connection``, each execution paid for that layer: the
connection's set-up, events and lazily begun transaction, the compiled-cache lookup, the
result objects; measured in-process, a third of an idempotent create's CPU. Here each statement
is compiled once for the driver by the engine's own dialect (so the SQL text and the parameter
processing are what SQLAlchemy would send) and executed on the asyncpg connection, in a
transaction this class begins on the first statement and ends when told to. Checking the
connection out with retries, the commit-outcome handling and the discard of a connection in an
unknown state are ``Database``'s, shared with the ORM sessions.

Errors are the driver's own (``asyncpg.UniqueViolationError``, not SQLAlchemy's
``IntegrityError``); ``service.errors`` classifies both.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.util import greenlet_spawn

from service.errors import answered_by_server

DRIVER_DIALECT = asyncpg_dialect()  # type: ignore[no-untyped-call]
"""The engine's dialect, for statements compiled to run on the driver connection itself."""

_REQUIRED = object()


@dataclass(frozen=True, slots=True)
class CompiledWrite:
    """A statement compiled for the driver: its SQL and, in ``$n`` order, each parameter's name,
    its value when the statement carries one (a literal such as ``version + 1``) and the type's
    processing (JSONB is sent as JSON text, as SQLAlchemy's asyncpg codecs expect)."""

    sql: str
    parameters: tuple[tuple[str, Any, Callable[[Any], Any] | None], ...]

    @classmethod
    def compile(cls, statement: ClauseElement) -> CompiledWrite:
        compiled: Any = statement.compile(dialect=DRIVER_DIALECT)
        parameters = []
        for name in compiled.positiontup or ():
            bind = compiled.binds[name]
            literal = bind.value if bind.value is not None or not bind.required else _REQUIRED
            if bind.callable is not None:
                raise ValueError(f"{name}: a parameter computed at execution is not supported")
            processor = bind.type.dialect_impl(DRIVER_DIALECT).bind_processor(DRIVER_DIALECT)
            parameters.append((name, literal, processor))
        return cls(compiled.string, tuple(parameters))

    def arguments(self, values: Mapping[str, Any]) -> list[Any]:
        arguments = []
        for name, literal, processor in self.parameters:
            value = values[name] if literal is _REQUIRED else values.get(name, literal)
            arguments.append(processor(value) if processor is not None else value)
        return arguments


class CompiledStatements:
    """The statements compiled so far, by statement object (least recently used out first).

    Each entry keeps its statement alive, so a statement built later can never be mistaken for
    it; and the request path only builds statements once (per shape), so the bound is never
    reached in practice and a caller that builds one per request only churns the cache.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._entries: OrderedDict[int, tuple[ClauseElement, CompiledWrite]] = OrderedDict()

    def get(self, statement: ClauseElement) -> CompiledWrite:
        entry = self._entries.get(id(statement))
        if entry is not None and entry[0] is statement:
            self._entries.move_to_end(id(statement))
            return entry[1]
        compiled = CompiledWrite.compile(statement)
        self._entries[id(statement)] = (statement, compiled)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return compiled


class DriverResult:
    """The rows of one statement, with the accessors the writes use on SQLAlchemy's results."""

    __slots__ = ("_rows",)

    def __init__(self, rows: Sequence[Any]) -> None:
        self._rows = rows

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise LookupError(f"expected one row, got {len(self._rows)}")
        return self._rows[0]

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def all(self) -> Sequence[Any]:
        return self._rows

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None


class WriteConnection:
    """A pooled driver connection lent for one read-write transaction.

    ``BEGIN`` goes out with the first statement (as SQLAlchemy's autobegin does), ``commit`` and
    ``rollback`` end the transaction and the next statement begins another; ``invalidate``
    closes the connection at once and keeps it out of the pool.
    """

    __slots__ = (
        "_driver",
        "_on_query",
        "_pooled",
        "_statements",
        "_transaction",
        "invalidated",
        "state_unknown",
    )

    def __init__(
        self,
        pooled: Any,
        statements: CompiledStatements,
        on_query: Callable[[float], None] | None,
    ) -> None:
        self._pooled = pooled
        self._driver: Any = pooled.driver_connection
        self._statements = statements
        self._on_query = on_query
        self._transaction: Any = None
        self.invalidated = False
        # Set when the driver failed without the server's answer (a lost link, a client-side
        # timeout, a cancelled statement) or while beginning: no ROLLBACK can be trusted on
        # such a connection, and ``Database.rollback_or_discard`` discards it instead.
        self.state_unknown = False

    def in_transaction(self) -> bool:
        return self._transaction is not None

    async def execute(
        self, statement: ClauseElement, values: Mapping[str, Any] | None = None
    ) -> DriverResult:
        compiled = self._statements.get(statement)
        arguments = compiled.arguments(values or {})
        if self._transaction is None:
            transaction = self._driver.transaction()
            try:
                await transaction.start()
            except BaseException:
                # asyncpg keeps a transaction that failed to begin as the connection's current
                # one: every later one there would be a SAVEPOINT. The connection must go.
                self.state_unknown = True
                raise
            self._transaction = transaction
        started = time.perf_counter()
        try:
            rows = await self._driver.fetch(compiled.sql, *arguments)
        except BaseException as error:
            if not answered_by_server(error):
                self.state_unknown = True
            raise
        if self._on_query is not None:
            self._on_query(time.perf_counter() - started)
        return DriverResult(rows)

    async def scalar(
        self, statement: ClauseElement, values: Mapping[str, Any] | None = None
    ) -> Any:
        return (await self.execute(statement, values)).scalar()

    async def commit(self) -> None:
        transaction, self._transaction = self._transaction, None
        if transaction is not None:
            await transaction.commit()

    async def rollback(self) -> None:
        transaction, self._transaction = self._transaction, None
        if transaction is not None:
            await transaction.rollback()

    async def invalidate(self) -> None:
        """Close the connection without a word to the server and keep it out of the pool: its
        state is unknown (closing ends the transaction on the server; nothing uncommitted is
        applied)."""
        self._transaction = None
        if not self.invalidated:
            self.invalidated = True
            # The socket first, at once: the pool's own invalidation would first try a graceful
            # close, which waits (up to 2 s) on a server that may be the reason we are here.
            self._driver.terminate()
            await greenlet_spawn(self._pooled.invalidate)

    async def release(self) -> None:
        """Back to the pool (an invalidated connection has already left it)."""
        if not self.invalidated:
            await greenlet_spawn(self._pooled.close)
