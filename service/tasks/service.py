"""Task use cases: what a write means, apart from how it arrived over HTTP.

The router parses and authorises, calls one of these, and maps the outcome to a response. The
one use case with more to it than a repository call is creating a task under an
``Idempotency-Key``: claim the key (replaying the stored response when it was used before),
create, and store the response in the same transaction, so a retried POST creates nothing new.
Reads go straight from the router to ``TaskReader`` on ``Database.read``: a read is one
statement and gets no layer that could add to its cost.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from service.db import Transaction
from service.idempotency.store import IdempotencyStore, StoredResponse, request_fingerprint
from service.tasks.etag import ETagCondition
from service.tasks.idempotent_create import KeyAlreadyStoredError, create_once
from service.tasks.repository import NewTask, TaskRecord, TaskRepository
from service.tasks.schemas import TaskCreate


@dataclass(frozen=True, slots=True)
class IdempotentRequest:
    """The key a client sent and the request it names (the fingerprint covers both)."""

    key: str
    method: str
    path: str


@dataclass(frozen=True, slots=True)
class Created:
    """A new task (under an idempotency key, its response is stored for its retries)."""

    record: TaskRecord


@dataclass(frozen=True, slots=True)
class Replayed:
    """The key was used before by the same request: its stored response, nothing created."""

    stored: StoredResponse


def new_task(data: TaskCreate) -> NewTask:
    return NewTask(
        title=data.title,
        description=data.description,
        status=data.status,
        priority=data.priority,
        due_at=data.due_at,
        tags=tuple(data.tags),
    )


# The statement sets the timestamps and the version of the stored response (the database's).
_SET_BY_THE_DATABASE = datetime(1970, 1, 1, tzinfo=UTC)


def _provisional(task_id: uuid.UUID, task: NewTask) -> TaskRecord:
    """The record as the database will return it, but for what only the database decides."""
    return TaskRecord(
        id=task_id,
        title=task.title,
        description=task.description,
        status=task.status.value,
        priority=task.priority,
        due_at=None if task.due_at is None else task.due_at.astimezone(UTC),
        tags=list(task.tags),
        created_at=_SET_BY_THE_DATABASE,
        updated_at=_SET_BY_THE_DATABASE,
        version=1,
    )


class TaskService:
    def __init__(self, session: Transaction, *, idempotency_ttl: timedelta) -> None:
        self.session = session
        self.tasks = TaskRepository(session)
        self.idempotency_ttl = idempotency_ttl

    async def create(
        self,
        owner_id: uuid.UUID,
        data: TaskCreate,
        *,
        idempotency: IdempotentRequest | None,
        response_for: Callable[[TaskRecord], StoredResponse],
    ) -> Created | Replayed:
        """Create a task; under an idempotency key, at most once per key.

        ``response_for`` renders the response a replay must repeat (it is stored with the key).
        Raises ``IdempotencyKeyInUseError`` (409) or ``IdempotencyKeyReusedError`` (422).
        """
        if idempotency is None:
            return Created(record=await self.tasks.create(owner_id, new_task(data)))
        fingerprint = request_fingerprint(
            idempotency.method, idempotency.path, data.model_dump(mode="json")
        )
        try:
            return await self._create_once(
                owner_id, new_task(data), idempotency, fingerprint, response_for
            )
        except KeyAlreadyStoredError:
            # Nothing of the statement was applied; its transaction is aborted.
            await self.session.rollback()
        return await self._create_step_by_step(
            owner_id, data, idempotency, fingerprint, response_for
        )

    async def _create_once(
        self,
        owner_id: uuid.UUID,
        task: NewTask,
        idempotency: IdempotentRequest,
        fingerprint: str,
        response_for: Callable[[TaskRecord], StoredResponse],
    ) -> Created | Replayed:
        """The usual case in one statement (``idempotent_create``)."""
        task_id = uuid.uuid4()
        outcome = await create_once(
            self.session,
            owner_id,
            task_id,
            task,
            key=idempotency.key,
            method=idempotency.method,
            path=idempotency.path,
            fingerprint=fingerprint,
            response=response_for(_provisional(task_id, task)),
            ttl=self.idempotency_ttl,
        )
        if isinstance(outcome, StoredResponse):
            return Replayed(outcome)
        await IdempotencyStore(self.session, ttl=self.idempotency_ttl).purge_sometimes()
        return Created(outcome)

    async def _create_step_by_step(
        self,
        owner_id: uuid.UUID,
        data: TaskCreate,
        idempotency: IdempotentRequest,
        fingerprint: str,
        response_for: Callable[[TaskRecord], StoredResponse],
    ) -> Created | Replayed:
        """The protocol one statement at a time: its lookup runs after its lock is held."""
        store = IdempotencyStore(self.session, ttl=self.idempotency_ttl)
        stored = await store.claim(owner_id, idempotency.key, fingerprint)
        if stored is not None:
            return Replayed(stored)
        record = await self.tasks.create(owner_id, new_task(data))
        await store.save(
            owner_id,
            idempotency.key,
            method=idempotency.method,
            path=idempotency.path,
            fingerprint=fingerprint,
            response=response_for(record),
        )
        return Created(record)

    async def update(
        self,
        owner_id: uuid.UUID,
        task_id: uuid.UUID,
        changes: dict[str, Any],
        *,
        if_match: ETagCondition | None,
    ) -> TaskRecord:
        return await self.tasks.update(owner_id, task_id, changes, if_match=if_match)

    async def delete(
        self, owner_id: uuid.UUID, task_id: uuid.UUID, *, if_match: ETagCondition | None
    ) -> None:
        await self.tasks.delete(owner_id, task_id, if_match=if_match)
