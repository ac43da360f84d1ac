"""Creating a task under an ``Idempotency-Key`` in one statement (one round trip).

The protocol is the one in ``service/idempotency/store.py`` (lock the key for the
transaction, look for a stored response, create, store the response); this runs its steps as
one data-modifying ``WITH`` statement instead of four, which was most of a POST's cost:

- ``claim``: ``pg_try_advisory_xact_lock``; not held means another request with the key is
  still running (409) and nothing else happens.
- ``existing``: the live stored response, if any (replayed, or a 422 for a different request).
- ``created``: the task, inserted only when the lock is held and nothing is stored.
- ``stored``: the response, inserted from the created row. The client's own fields come from
  the caller (``body`` and ``headers``); what the database decides is filled in here, in the
  exact spelling the API renders (``created_at``, ``updated_at``, ``version`` and the ETag).

One statement has one snapshot, taken *before* its lock is acquired. If the request that held
the lock committed in between, ``existing`` misses its record and the insert into
``idempotency_keys`` collides with it. That unique violation (like the collision with an
expired record of the same key, which the full protocol overwrites) aborts the statement, so
nothing of it is applied, and the caller falls back to the step-by-step protocol, whose lookup
runs after its lock (``KeyAlreadyStoredError``).
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any, cast

import asyncpg
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Interval,
    String,
    Table,
    bindparam,
    case,
    exc,
    func,
    insert,
    literal_column,
    select,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB

from service.db import Transaction
from service.idempotency.store import (
    RECORD_FIELDS,
    IdempotencyKeyInUseError,
    IdempotencyKeyReusedError,
    StoredResponse,
    advisory_lock_id,
    records,
)
from service.tasks.models import Task
from service.tasks.repository import COLUMNS, NewTask, TaskRecord

tasks = cast(Table, Task.__table__)


class KeyAlreadyStoredError(Exception):
    """The key has a record the statement's snapshot did not show (a race lost, or an expired
    record to overwrite): nothing was applied; run the step-by-step protocol instead."""


def _text(value: str) -> ColumnElement[str]:
    # Constants written into the SQL, not sent as parameters (the text is fixed, not input).
    assert "'" not in value
    return literal_column(f"'{value}'", String)


def rfc3339(column: ColumnElement[Any]) -> ColumnElement[str]:
    """A ``timestamptz`` as the API writes it (orjson, UTC as ``Z``): microseconds only when
    there are any. ``tests/integration/test_idempotent_create.py`` holds the two to the
    same text."""
    utc = func.timezone(_text("UTC"), column)
    whole = func.date_trunc(_text("second"), column) == column
    fraction = case((whole, _text("")), else_=func.to_char(utc, _text(".US")))
    return func.concat(func.to_char(utc, _text('YYYY-MM-DD"T"HH24:MI:SS')), fraction, _text("Z"))


def _statement() -> Any:
    claim = select(
        func.pg_try_advisory_xact_lock(bindparam("lock_id", type_=BigInteger)).label("held")
    ).cte("claim")
    owner = bindparam("owner_id", type_=records.c.owner_id.type)
    key = bindparam("key", type_=records.c.key.type)
    existing = (
        select(
            records.c.request_hash,
            records.c.status_code,
            records.c.response_body,
            records.c.response_headers,
        )
        .where(records.c.owner_id == owner, records.c.key == key, records.c.expires_at > func.now())
        .cte("existing")
    )
    # The columns of NewTask.column_values: the rest are the database's defaults.
    fields = ("id", "owner_id", "title", "description", "status", "priority", "due_at", "tags")
    row = (
        select(*(bindparam(name, type_=tasks.c[name].type) for name in fields))
        .select_from(claim)
        .where(claim.c.held, ~select(existing.c.request_hash).exists())
    )
    created = insert(tasks).from_select(fields, row).returning(*COLUMNS).cte("created")
    decided = func.jsonb_build_object(
        _text("created_at"),
        rfc3339(created.c.created_at),
        _text("updated_at"),
        rfc3339(created.c.updated_at),
        _text("version"),
        created.c.version,
    )
    etag = func.jsonb_build_object(
        _text("ETag"), func.concat(_text('"'), created.c.version, _text('"'))
    )
    body = bindparam("body", type_=JSONB).op("||", return_type=JSONB)(decided)
    headers = bindparam("headers", type_=JSONB).op("||", return_type=JSONB)(etag)
    response = select(
        owner,
        key,
        bindparam("method", type_=records.c.method.type),
        bindparam("path", type_=records.c.path.type),
        bindparam("request_hash", type_=records.c.request_hash.type),
        literal_column("201"),
        body,
        headers,
        func.now(),
        func.now() + bindparam("ttl", type_=Interval),
    ).select_from(created)
    stored = (
        insert(records)
        .from_select(("owner_id", "key", *RECORD_FIELDS), response)
        .returning(records.c.key)
        .cte("stored")
    )
    return (
        select(
            claim.c.held,
            existing.c.request_hash,
            existing.c.status_code,
            existing.c.response_body,
            existing.c.response_headers,
            *(created.c[column.name] for column in COLUMNS),
        )
        .select_from(claim.outerjoin(existing, true()).outerjoin(created, true()))
        .add_cte(stored)
    )


CREATE_ONCE = _statement()
"""Built once, so SQLAlchemy computes its cache key once (see ``service/idempotency/store.py``)."""


async def create_once(
    connection: Transaction,
    owner_id: uuid.UUID,
    task_id: uuid.UUID,
    data: NewTask,
    *,
    key: str,
    method: str,
    path: str,
    fingerprint: str,
    response: StoredResponse,
    ttl: timedelta,
) -> StoredResponse | TaskRecord:
    """Run the statement: the stored response to replay, or the task it created.

    ``response`` is the 201 to store; its ``created_at``, ``updated_at``, ``version`` and
    ``ETag`` are the database's, set by the statement. Raises what
    ``IdempotencyStore.claim`` raises (409, 422), or ``KeyAlreadyStoredError`` (the statement
    failed: roll back, then run the step-by-step protocol).
    """
    values = {
        **data.column_values(task_id, owner_id),
        "lock_id": advisory_lock_id(owner_id, key),
        "key": key,
        "method": method,
        "path": path,
        "request_hash": fingerprint,
        "body": response.body,
        "headers": response.headers,
        "ttl": ttl,
    }
    try:
        row = (await connection.execute(CREATE_ONCE, values)).one()
    except (exc.IntegrityError, asyncpg.UniqueViolationError) as error:
        if _is_record_collision(error):
            raise KeyAlreadyStoredError from None
        raise
    held, request_hash, status_code, body, headers = row[:5]
    if not held:
        raise IdempotencyKeyInUseError()
    if request_hash is not None:
        if request_hash != fingerprint:
            raise IdempotencyKeyReusedError()
        return StoredResponse(status_code, body, dict(headers))
    return TaskRecord.from_row(row[5:])


def _is_record_collision(error: Exception) -> bool:
    # On a session SQLAlchemy wraps the driver's error (its asyncpg adapter's, from asyncpg's).
    orig = getattr(error, "orig", None)
    driver = error if orig is None else orig.__cause__
    return getattr(driver, "table_name", None) == records.name and (
        getattr(driver, "sqlstate", None) == "23505"
    )
