"""The two ceilings ``make bench`` measures the service against.

``constant_app`` is the fastest an ASGI app can answer under this server configuration (no
routing, no validation, no database). ``raw_asyncpg_app`` does the same primary-key SELECT as
``GET /v1/tasks/{id}`` with a bare asyncpg pool, no ORM, no auth, no middleware. The ratio of the
service to each says how much the framework and the database path cost.

Served by the same gunicorn + uvicorn worker class and worker count as the service.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

Scope = dict[str, Any]

CONSTANT_BODY = orjson.dumps({"id": "00000000-0000-0000-0000-000000000000", "title": "constant"})
TASK_SQL = (
    "SELECT id, title, description, status, priority, due_at, tags, created_at, updated_at, "
    "version FROM tasks WHERE id = $1 AND owner_id = $2"
)


async def _send_json(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Any, send: Any, startup: Any = None, shutdown: Any = None) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if startup:
                await startup()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if shutdown:
                await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def constant_app(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await _send_json(send, 200, CONSTANT_BODY)


class RawAsyncpgApp:
    def __init__(self) -> None:
        self.pool: asyncpg.Pool | None = None
        self.owner = uuid.UUID(os.environ["BENCH_OWNER_ID"])

    async def _startup(self) -> None:
        dsn = os.environ["BENCH_DSN"]
        size = int(os.environ.get("SQLALCHEMY_POOL_SIZE", "5"))
        self.pool = await asyncpg.create_pool(dsn, min_size=size, max_size=size)

    async def _shutdown(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self._startup, self._shutdown)
            return
        assert self.pool is not None
        task_id = uuid.UUID(scope["path"].rsplit("/", 1)[-1])
        row = await self.pool.fetchrow(TASK_SQL, task_id, self.owner)
        if row is None:
            await _send_json(send, 404, b'{"status":404}')
            return
        record = dict(row)
        await _send_json(send, 200, orjson.dumps(record, default=str))


def raw_asyncpg_app() -> RawAsyncpgApp:
    """gunicorn factory: ``tools.bench.ceilings:raw_asyncpg_app()``."""
    return RawAsyncpgApp()


# --- the same-framework ceiling -------------------------------------------------------------
# What a competent plain FastAPI service does for the same three requests: an asyncpg pool on
# lifespan state, one statement per request, a pydantic response model. No auth, no ownership
# beyond the fixed owner, no middleware, no idempotency, no metrics or access log. The service
# is held to a multiple of this figure, in the same run, on the same machine.

LIST_SQL = (
    "SELECT id, title, description, status, priority, due_at, tags, created_at, updated_at, "
    "version FROM tasks WHERE owner_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2"
)
INSERT_SQL = (
    "INSERT INTO tasks (id, owner_id, title, tags) VALUES ($1, $2, $3, $4) RETURNING id, title, "
    "description, status, priority, due_at, tags, created_at, updated_at, version"
)


class TaskOut(BaseModel):
    id: uuid.UUID
    title: str
    description: str | None
    status: str
    priority: int
    due_at: datetime | None
    tags: list[str]
    created_at: datetime
    updated_at: datetime
    version: int


class TaskIn(BaseModel):
    title: str = Field(min_length=1, max_length=200)
    tags: list[str] = Field(default_factory=list, max_length=20)


def fastapi_asyncpg_app() -> FastAPI:
    """gunicorn factory: ``tools.bench.ceilings:fastapi_asyncpg_app()``."""
    owner = uuid.UUID(os.environ["BENCH_OWNER_ID"])

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        size = int(os.environ.get("SQLALCHEMY_POOL_SIZE", "5"))
        pool = await asyncpg.create_pool(os.environ["BENCH_DSN"], min_size=size, max_size=size)
        try:
            yield {"pool": pool}
        finally:
            await pool.close()

    app = FastAPI(lifespan=lifespan, openapi_url=None)

    @app.get("/v1/tasks/{task_id}", response_model=TaskOut)
    async def get_task(task_id: uuid.UUID, request: Request) -> Any:
        row = await request.state.pool.fetchrow(TASK_SQL, task_id, owner)
        if row is None:
            raise HTTPException(404)
        return dict(row)

    @app.get("/v1/tasks", response_model=list[TaskOut])
    async def list_tasks(request: Request, limit: int = 20) -> Any:
        return [dict(row) for row in await request.state.pool.fetch(LIST_SQL, owner, limit)]

    @app.post("/v1/tasks", response_model=TaskOut, status_code=201)
    async def create_task(body: TaskIn, request: Request) -> Any:
        row = await request.state.pool.fetchrow(
            INSERT_SQL, uuid.uuid4(), owner, body.title, body.tags
        )
        return dict(row)

    return app
