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
from typing import Any

import asyncpg
import orjson

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
    """gunicorn factory: ``tests.bench.ceilings:raw_asyncpg_app()``."""
    return RawAsyncpgApp()
