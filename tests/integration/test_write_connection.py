"""The request path's write transaction on the driver connection (service/write_connection.py),
against the real PostgreSQL: what SQLAlchemy's engine did for these statements, it must still
do (parameters processed by type, literals bound, one transaction, the pool accounting), and a
connection in an unknown state must never go back to the pool."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any, cast

import asyncpg
import pytest
from sqlalchemy import Integer, Table, bindparam, func, literal_column, select
from sqlalchemy.dialects.postgresql import JSONB

from service.db import Database
from service.settings import Settings
from service.tasks.models import Task
from service.tasks.repository import INSERT, _update_statement
from service.write_connection import CompiledStatements, CompiledWrite

tasks = cast(Table, Task.__table__)


def _new_task(owner_id: uuid.UUID, title: str) -> dict[str, Any]:
    return {
        "id": uuid.uuid4(),
        "owner_id": owner_id,
        "title": title,
        "description": None,
        "status": "todo",
        "priority": 1,
        "due_at": None,
        "tags": ["a", "b"],
    }


def test_literals_are_bound_and_types_processed() -> None:
    statement = select(
        bindparam("doc", type_=JSONB) + literal_column("'{}'::jsonb"),
        bindparam("n", type_=Integer) + 1,
    )
    compiled = CompiledWrite.compile(statement)
    arguments = compiled.arguments({"doc": {"k": [1, "x"]}, "n": 41})
    # JSONB goes as JSON text (SQLAlchemy's asyncpg codec takes text); the literal 1 is bound.
    assert arguments == ['{"k": [1, "x"]}', 41, 1]
    with pytest.raises(KeyError):
        compiled.arguments({"n": 1})


def test_a_parameter_computed_at_execution_is_refused() -> None:
    with pytest.raises(ValueError, match="computed at execution"):
        CompiledWrite.compile(select(bindparam("now", callable_=lambda: 1, type_=Integer)))


def test_the_compiled_statements_are_bounded_and_never_confuse_two_statements() -> None:
    cache = CompiledStatements(size=2)
    first = select(bindparam("a", type_=Integer))
    compiled = cache.get(first)
    assert cache.get(first) is compiled  # compiled once
    for n in range(3):
        cache.get(select(bindparam(f"b{n}", type_=Integer)))
    assert len(cache._entries) == 2
    # Evicted: compiled again, to the same SQL; a statement built later is compiled on its own.
    assert cache.get(first) is not compiled
    assert cache.get(first).sql == compiled.sql
    other = select(bindparam("c", type_=Integer) + 1)
    assert cache.get(other).sql != compiled.sql


async def test_statements_run_in_one_transaction_begun_with_the_first(database: Database) -> None:
    owner_id = uuid.uuid4()
    async with database.transaction() as connection:
        assert not connection.in_transaction()
        row = (await connection.execute(INSERT, _new_task(owner_id, "one"))).one()
        assert connection.in_transaction()
        assert row[1] == "one"
        assert list(row[6]) == ["a", "b"]  # the text[] parameter, processed as SQLAlchemy does
        backend = await connection.scalar(select(func.txid_current()))
        again = await connection.scalar(select(func.txid_current()))
        assert backend == again
        # PATCH's statement: the literal version + 1 and now() come from the statement itself.
        updated = (
            await connection.execute(
                _update_statement(frozenset({"title"}), True),
                {"title": "two", "task_id": row[0], "owner_id": owner_id, "versions": [3, 1]},
            )
        ).one()
        assert (updated[1], updated[9]) == ("two", 2)
    async with database.transaction() as connection:
        stored = await connection.scalar(
            select(tasks.c.title).where(tasks.c.id == bindparam("id")), {"id": row[0]}
        )
    assert stored == "two"


async def test_rollback_undoes_and_the_next_statement_begins_again(database: Database) -> None:
    owner_id = uuid.uuid4()
    new = _new_task(owner_id, "rolled back")
    count = select(func.count()).select_from(tasks).where(tasks.c.owner_id == bindparam("o"))
    async with database.transaction() as connection:
        await connection.execute(INSERT, new)
        with pytest.raises(asyncpg.UniqueViolationError):
            await connection.execute(INSERT, new)
        await connection.rollback()
        assert not connection.in_transaction()
        assert await connection.scalar(count, {"o": owner_id}) == 0
        await connection.execute(INSERT, _new_task(owner_id, "kept"))
    async with database.transaction() as connection:
        assert await connection.scalar(count, {"o": owner_id}) == 1


async def test_an_error_in_the_block_rolls_back_and_returns_the_connection(
    database: Database,
) -> None:
    owner_id = uuid.uuid4()
    with pytest.raises(RuntimeError):
        async with database.transaction() as connection:
            await connection.execute(INSERT, _new_task(owner_id, "undone"))
            raise RuntimeError("the handler failed")
    assert database.pool_status().checked_out == 0
    async with database.transaction() as connection:
        count = await connection.scalar(
            select(func.count()).select_from(tasks).where(tasks.c.owner_id == bindparam("o")),
            {"o": owner_id},
        )
    assert count == 0


async def test_an_invalidated_connection_is_closed_at_once_and_kept_out_of_the_pool(
    database: Database,
) -> None:
    async with database.transaction() as connection:
        await connection.scalar(select(literal_column("1")))
        driver = connection._driver
        await connection.invalidate()
        assert driver.is_closed()
        assert not connection.in_transaction()
    assert database.pool_status().checked_out == 0
    async with database.transaction() as connection:
        assert connection._driver is not driver
        assert await connection.scalar(select(literal_column("1"))) == 1


async def test_a_begin_cut_short_discards_the_connection(
    make_settings: Callable[..., Settings],
) -> None:
    """asyncpg keeps a transaction that failed to begin as the connection's current one, so any
    later one there would be a SAVEPOINT outside a transaction: such a connection must never go
    back to the pool (one pooled connection here, so a leak would be met at once)."""
    database = Database(make_settings(sqlalchemy_pool_size=1))
    try:
        with pytest.raises(TimeoutError):
            async with database.transaction() as connection:
                driver = connection._driver
                async with asyncio.timeout(0):
                    await connection.execute(select(literal_column("1")))
        assert driver.is_closed()
        assert database.pool_status().checked_out == 0
        async with database.transaction() as connection:
            assert await connection.scalar(select(func.txid_current_if_assigned())) is None
            assert await connection.scalar(select(literal_column("2"))) == 2
    finally:
        await database.dispose()


async def test_a_statement_the_server_never_answered_discards_the_connection(
    make_settings: Callable[..., Settings],
) -> None:
    """Cut short client-side (a deadline, a lost link), a statement leaves the connection in a
    state no ROLLBACK can be trusted with (on a vanished peer it would wait for an answer that
    never comes): discarded at once. An error the server reported is rolled back instead, and
    the connection reused."""
    database = Database(make_settings(sqlalchemy_pool_size=1))
    try:
        with pytest.raises(TimeoutError):
            async with database.transaction() as connection:
                await connection.scalar(select(literal_column("1")))
                driver = connection._driver
                async with asyncio.timeout(0.2):
                    await connection.execute(select(func.pg_sleep(5)))
        assert driver.is_closed()
        with pytest.raises(asyncpg.DivisionByZeroError):
            async with database.transaction() as connection:
                reused = connection._driver
                await connection.scalar(select(literal_column("1") / literal_column("0")))
        assert not reused.is_closed()
        async with database.transaction() as connection:
            assert connection._driver is reused
            assert await connection.scalar(select(literal_column("3"))) == 3
    finally:
        await database.dispose()
