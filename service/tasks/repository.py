"""Queries on tasks, always scoped to one owner.

Knows nothing of HTTP: it takes validated values, returns ``TaskRecord``s and raises domain
errors. Every statement filters on ``owner_id`` first, which is what makes another owner's task
indistinguishable from a missing one, and what lets every list query run on an index led by
``owner_id`` (see ``service/tasks/models.py`` and ``tests/integration/test_query_plans.py``).

Writes are single atomic statements (``UPDATE ... WHERE version = ... RETURNING``), never a
read-modify-write, so two concurrent PATCHes with the same ``If-Match`` cannot both win.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Integer,
    Select,
    Table,
    any_,
    bindparam,
    delete,
    func,
    insert,
    select,
    true,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.sql.dml import ReturningDelete, ReturningUpdate

from service.db import DriverQuery, ReadConnection, Transaction
from service.errors import NotFoundError, PreconditionFailedError
from service.tasks.cursor import SortKey, decode_cursor, encode_cursor, filters_fingerprint
from service.tasks.etag import ETagCondition
from service.tasks.models import PRIORITY_BY_RANK, PRIORITY_RANK, Task, TaskPriority, TaskStatus
from service.tasks.sorting import TaskSort

tasks = cast(Table, Task.__table__)

# Everything a response needs, nothing more (owner_id is implied by the query).
COLUMNS = (
    tasks.c.id,
    tasks.c.title,
    tasks.c.description,
    tasks.c.status,
    tasks.c.priority,
    tasks.c.due_at,
    tasks.c.tags,
    tasks.c.created_at,
    tasks.c.updated_at,
    tasks.c.version,
)


@dataclass(frozen=True, slots=True)
class TaskRecord:
    id: uuid.UUID
    title: str
    description: str | None
    status: str
    priority: TaskPriority
    due_at: datetime | None
    tags: list[str]
    created_at: datetime
    updated_at: datetime
    version: int

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> TaskRecord:
        (id_, title, description, status, rank, due_at, tags, created_at, updated_at, version) = row
        return cls(
            id_,
            title,
            description,
            status,
            PRIORITY_BY_RANK[rank],
            _aware(due_at),
            tags,
            created_at,
            updated_at,
            version,
        )

    def sort_key(self, sort: TaskSort) -> SortKey:
        if sort is TaskSort.PRIORITY:
            return (PRIORITY_RANK[self.priority], self.created_at, self.id)
        if sort in (TaskSort.DUE_AT, TaskSort.DUE_AT_DESC):
            return (self.due_at, self.id)
        return (self.created_at, self.id)


def _aware(value: datetime | None) -> datetime | None:
    # asyncpg returns PostgreSQL's +-infinity as a naive datetime.max / datetime.min. The API no
    # longer accepts those instants (see schemas.DUE_AT_MAX), but a row stored before it did
    # must still serialise with its "Z" and yield a cursor that decodes.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True, slots=True)
class NewTask:
    """The fields of a task to create (validated by the caller)."""

    title: str
    description: str | None
    status: TaskStatus
    priority: TaskPriority
    due_at: datetime | None
    tags: tuple[str, ...]

    def column_values(self, task_id: uuid.UUID, owner_id: uuid.UUID) -> dict[str, Any]:
        """The INSERT's values: the columns the database does not fill in itself."""
        return {
            "id": task_id,
            "owner_id": owner_id,
            "title": self.title,
            "description": self.description,
            "status": self.status.value,
            "priority": PRIORITY_RANK[self.priority],
            "due_at": self.due_at,
            "tags": list(self.tags),
        }


@dataclass(frozen=True, slots=True)
class TaskFilters:
    status: TaskStatus | None = None
    priority: TaskPriority | None = None
    tag: str | None = None
    q: str | None = None
    due_before: datetime | None = None
    due_after: datetime | None = None

    def fingerprint(self) -> str:
        return filters_fingerprint(
            {
                "status": self.status,
                "priority": self.priority,
                "tag": self.tag,
                "q": self.q,
                "due_before": self.due_before.isoformat() if self.due_before else None,
                "due_after": self.due_after.isoformat() if self.due_after else None,
            }
        )

    def values(self) -> dict[str, Any]:
        """The bind parameter values of the filters that are set (see ``clauses``)."""
        out: dict[str, Any] = {}
        if self.status is not None:
            out["status"] = self.status.value
        if self.priority is not None:
            out["priority"] = PRIORITY_RANK[self.priority]
        if self.tag is not None:
            out["tag"] = [self.tag]
        if self.q is not None:
            out["q"] = f"%{escape_like(self.q)}%"
        if self.due_before is not None:
            out["due_before"] = self.due_before
        if self.due_after is not None:
            out["due_after"] = self.due_after
        return out

    def clauses(self) -> list[ColumnElement[bool]]:
        """The conditions of the filters that are set, with named bind parameters: the
        statement depends only on which filters are set, never on their values."""
        c = tasks.c
        out: list[ColumnElement[bool]] = []
        if self.status is not None:
            out.append(c.status == bindparam("status", type_=c.status.type))
        if self.priority is not None:
            out.append(c.priority == bindparam("priority", type_=c.priority.type))
        if self.tag is not None:
            out.append(c.tags.contains(bindparam("tag", type_=c.tags.type)))
        if self.q is not None:
            out.append(c.title.ilike(bindparam("q", type_=c.title.type), escape="\\"))
        if self.due_before is not None:
            out.append(c.due_at < bindparam("due_before", type_=c.due_at.type))
        if self.due_after is not None:
            out.append(c.due_at >= bindparam("due_after", type_=c.due_at.type))
        return out

    @property
    def shape(self) -> tuple[bool, ...]:
        return (
            self.status is not None,
            self.priority is not None,
            self.tag is not None,
            self.q is not None,
            self.due_before is not None,
            self.due_after is not None,
        )

    @property
    def filters_due_at(self) -> bool:
        return self.due_before is not None or self.due_after is not None


@dataclass(frozen=True, slots=True)
class TaskPageResult:
    items: list[TaskRecord]
    next_cursor: str | None


def escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _after_params(after: SortKey) -> tuple[ColumnElement[Any], ...]:
    return tuple(bindparam(f"after_{index}") for index in range(len(after)))


def _list_shape(filters: TaskFilters, sort: TaskSort, after: SortKey | None) -> tuple[Any, ...]:
    """What the statement of a page depends on: which filters are set, the order, and the kind
    of cursor (none, on an undated task, or the number of key columns)."""
    cursor = None if after is None else ("undated" if after[0] is None else len(after))
    return (filters.shape, sort, cursor)


def _list_values(
    owner_id: uuid.UUID, filters: TaskFilters, limit: int, after: SortKey | None
) -> dict[str, Any]:
    values = filters.values()
    values["owner_id"] = owner_id
    values["limit"] = limit
    if after is not None:
        values.update({f"after_{index}": value for index, value in enumerate(after)})
    return values


def _list_template(filters: TaskFilters, sort: TaskSort, after: SortKey | None) -> Select[Any]:
    """The keyset query for one page, every value a named bind parameter."""
    c = tasks.c
    base = select(*COLUMNS).where(
        c.owner_id == bindparam("owner_id", type_=c.owner_id.type), *filters.clauses()
    )
    limit = bindparam("limit", type_=Integer)
    keys = None if after is None else _after_params(after)
    if sort is TaskSort.CREATED_AT:
        if keys is not None:
            base = base.where(tuple_(c.created_at, c.id) > tuple_(*keys))
        return base.order_by(c.created_at.asc(), c.id.asc()).limit(limit)
    if sort is TaskSort.CREATED_AT_DESC:
        if keys is not None:
            base = base.where(tuple_(c.created_at, c.id) < tuple_(*keys))
        return base.order_by(c.created_at.desc(), c.id.desc()).limit(limit)
    if sort is TaskSort.PRIORITY:
        # Urgent first; within a priority newest first, as the default order. All columns
        # descend together, so this is one backward scan of ix_tasks_owner_priority.
        if keys is not None:
            base = base.where(tuple_(c.priority, c.created_at, c.id) < tuple_(*keys))
        return base.order_by(c.priority.desc(), c.created_at.desc(), c.id.desc()).limit(limit)
    return _due_statement(
        base,
        descending=sort is TaskSort.DUE_AT_DESC,
        limit=limit,
        after=None if after is None or keys is None else (after, keys),
        with_undated=not filters.filters_due_at,
    )


def list_statement(
    owner_id: uuid.UUID,
    filters: TaskFilters,
    sort: TaskSort,
    limit: int,
    after: SortKey | None = None,
) -> Select[Any]:
    """The keyset query for one page (``limit`` rows) with its values. Public so the
    query-plan test can EXPLAIN exactly what the API runs."""
    return _list_template(filters, sort, after).params(
        _list_values(owner_id, filters, limit, after)
    )


# The SQL of each page shape, compiled on first use: a handful of shapes, each compiled once
# per process, so a page costs no statement building.
_LIST_QUERIES: dict[tuple[Any, ...], DriverQuery] = {}


def list_query(
    owner_id: uuid.UUID,
    filters: TaskFilters,
    sort: TaskSort,
    limit: int,
    after: SortKey | None = None,
) -> tuple[DriverQuery, dict[str, Any]]:
    shape = _list_shape(filters, sort, after)
    query = _LIST_QUERIES.get(shape)
    if query is None:
        query = _LIST_QUERIES[shape] = DriverQuery.compile(_list_template(filters, sort, after))
    return query, _list_values(owner_id, filters, limit, after)


def _due_statement(
    base: Select[Any],
    *,
    descending: bool,
    limit: ColumnElement[Any],
    after: tuple[SortKey, tuple[ColumnElement[Any], ...]] | None,
    with_undated: bool,
) -> Select[Any]:
    """``due_at`` order with tasks that have no due date last, in both directions.

    A row comparison ``(due_at, id) > (:d, :i)`` is an index range, but it never matches a
    NULL ``due_at``. So the page is the union of two range scans of ix_tasks_owner_due, each
    at most ``limit`` rows: dated tasks after the cursor, then undated tasks by id. Once the
    cursor is on an undated task only the second part remains; with a ``due_before`` or
    ``due_after`` filter only the first.
    """
    c = tasks.c
    # Both parts order by (due_at, id) even where due_at is NULL throughout: that is the
    # index's own order, so each part is an ordered index scan that stops after ``limit`` rows.
    # (PostgreSQL does not treat "due_at IS NULL" as fixing the column, so "ORDER BY id" alone
    # would read and sort all of the owner's undated tasks.)
    order = (c.due_at.desc(), c.id.desc()) if descending else (c.due_at.asc(), c.id.asc())
    if after is not None and after[0][0] is None:
        after_id = bindparam("after_1", type_=c.id.type)
        return (
            base.where(c.due_at.is_(None), c.id < after_id if descending else c.id > after_id)
            .order_by(*order)
            .limit(limit)
        )

    dated = base.where(c.due_at.is_not(None))
    if after is not None:
        row, cursor = tuple_(c.due_at, c.id), tuple_(*after[1])
        dated = dated.where(row < cursor if descending else row > cursor)
    dated = dated.order_by(*order).limit(limit)
    if not with_undated:
        return dated

    undated = base.where(c.due_at.is_(None)).order_by(*order).limit(limit)
    page = union_all(dated, undated).subquery("page")
    p = page.c
    return (
        select(*(p[col.name] for col in COLUMNS))
        .order_by(
            p.due_at.is_(None),
            p.due_at.desc() if descending else p.due_at.asc(),
            p.id.desc() if descending else p.id.asc(),
        )
        .limit(limit)
    )


# The hot paths run prebuilt statements with bind parameters: building a statement and its
# cache key on every request costs more than the rest of SQLAlchemy's work put together.
GET_BY_ID = select(*COLUMNS).where(
    tasks.c.id == bindparam("task_id"), tasks.c.owner_id == bindparam("owner_id")
)
"""One primary-key lookup; the owner condition makes another owner's task a miss."""
GET_BY_ID_QUERY = DriverQuery.compile(GET_BY_ID)

INSERTED_COLUMNS = (
    "id",
    "owner_id",
    "title",
    "description",
    "status",
    "priority",
    "due_at",
    "tags",
)
"""What ``NewTask.column_values`` gives; the database fills in the rest."""
INSERT = (
    insert(tasks)
    .values({name: bindparam(name, type_=tasks.c[name].type) for name in INSERTED_COLUMNS})
    .returning(*COLUMNS)
)
EXISTING_VERSION = select(tasks.c.version).where(
    tasks.c.id == bindparam("task_id"), tasks.c.owner_id == bindparam("owner_id")
)
"""Only on a write's failure path: tells a stale If-Match (412) from a missing task (404)."""
_VERSIONS = bindparam("versions", type_=ARRAY(Integer))


def _version_condition(checked: bool) -> ColumnElement[bool]:
    # One statement for any number of ETags in If-Match: = ANY(array), not an IN list.
    return tasks.c.version == any_(_VERSIONS) if checked else true()


def _checks_versions(if_match: ETagCondition | None) -> bool:
    return if_match is not None and not if_match.any


def _versions(if_match: ETagCondition | None) -> dict[str, Any]:
    return {"versions": sorted(if_match.versions)} if if_match and not if_match.any else {}


# Built once per shape (which columns change, whether If-Match names versions): at most 2^6 x 2
# UPDATEs and 2 DELETEs, each compiled once for the driver (service/write_connection.py).
@cache
def _update_statement(columns: frozenset[str], checked: bool) -> ReturningUpdate[Any]:
    return (
        update(tasks)
        .where(
            tasks.c.id == bindparam("task_id"),
            tasks.c.owner_id == bindparam("owner_id"),
            _version_condition(checked),
        )
        .values(
            {
                **{name: bindparam(name, type_=tasks.c[name].type) for name in sorted(columns)},
                "version": tasks.c.version + 1,
                "updated_at": func.now(),
            }
        )
        .returning(*COLUMNS)
    )


@cache
def _delete_statement(checked: bool) -> ReturningDelete[Any]:
    return (
        delete(tasks)
        .where(
            tasks.c.id == bindparam("task_id"),
            tasks.c.owner_id == bindparam("owner_id"),
            _version_condition(checked),
        )
        .returning(tasks.c.id)
    )


class TaskRepository:
    def __init__(self, session: Transaction) -> None:
        self.session = session

    async def create(self, owner_id: uuid.UUID, data: NewTask) -> TaskRecord:
        values = data.column_values(uuid.uuid4(), owner_id)
        return TaskRecord.from_row((await self.session.execute(INSERT, values)).one())

    async def get(self, owner_id: uuid.UUID, task_id: uuid.UUID) -> TaskRecord:
        parameters = {"task_id": task_id, "owner_id": owner_id}
        row = (await self.session.execute(GET_BY_ID, parameters)).first()
        if row is None:
            raise NotFoundError("Task not found")
        return TaskRecord.from_row(row)

    async def update(
        self,
        owner_id: uuid.UUID,
        task_id: uuid.UUID,
        changes: dict[str, Any],
        *,
        if_match: ETagCondition | None = None,
    ) -> TaskRecord:
        """Apply ``changes`` (field -> new value, None clears) if ``if_match`` holds.

        An empty patch changes nothing, so it keeps the version (and the ETag).
        """
        if not changes:
            record = await self.get(owner_id, task_id)
            if if_match is not None and not if_match.matches(record.version):
                raise PreconditionFailedError("The task has changed; fetch it and retry")
            return record
        values = dict(changes)
        if "priority" in values:
            values["priority"] = PRIORITY_RANK[values["priority"]]
        if "status" in values:
            values["status"] = TaskStatus(values["status"]).value
        statement = _update_statement(frozenset(values), _checks_versions(if_match))
        values |= {"task_id": task_id, "owner_id": owner_id, **_versions(if_match)}
        row = (await self.session.execute(statement, values)).first()
        if row is None:
            await self._raise_missing_or_changed(owner_id, task_id)
        assert row is not None
        return TaskRecord.from_row(row)

    async def delete(
        self,
        owner_id: uuid.UUID,
        task_id: uuid.UUID,
        *,
        if_match: ETagCondition | None = None,
    ) -> None:
        statement = _delete_statement(_checks_versions(if_match))
        values = {"task_id": task_id, "owner_id": owner_id, **_versions(if_match)}
        if (await self.session.execute(statement, values)).first() is None:
            await self._raise_missing_or_changed(owner_id, task_id)

    async def _raise_missing_or_changed(self, owner_id: uuid.UUID, task_id: uuid.UUID) -> None:
        exists = await self.session.scalar(
            EXISTING_VERSION, {"task_id": task_id, "owner_id": owner_id}
        )
        if exists is None:
            raise NotFoundError("Task not found")
        raise PreconditionFailedError("The task has changed; fetch it and retry")


class TaskReader:
    """The request path's reads, on a ``ReadConnection`` (``Database.read``).

    The same statements as ``TaskRepository`` would run, compiled once, sent by the driver, and
    each row turned into a ``TaskRecord`` directly: no ORM session, no result objects.
    """

    def __init__(self, connection: ReadConnection) -> None:
        self.connection = connection

    async def get(self, owner_id: uuid.UUID, task_id: uuid.UUID) -> TaskRecord:
        row = await self.connection.fetchrow(
            GET_BY_ID_QUERY, {"task_id": task_id, "owner_id": owner_id}
        )
        if row is None:
            raise NotFoundError("Task not found")
        return TaskRecord.from_row(row)

    async def list_page(
        self,
        owner_id: uuid.UUID,
        *,
        filters: TaskFilters,
        sort: TaskSort,
        limit: int,
        cursor: str | None = None,
    ) -> TaskPageResult:
        fingerprint = filters.fingerprint()
        after = decode_cursor(cursor, sort, fingerprint) if cursor else None
        # One extra row says whether there is a next page without a COUNT.
        query, values = list_query(owner_id, filters, sort, limit + 1, after)
        rows = await self.connection.fetch(query, values)
        items = [TaskRecord.from_row(row) for row in rows[:limit]]
        next_cursor = (
            encode_cursor(sort, fingerprint, items[-1].sort_key(sort))
            if len(rows) > limit
            else None
        )
        return TaskPageResult(items, next_cursor)
