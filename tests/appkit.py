"""The real app in-process: lifespan running, an httpx client on it, the app and its state.

What an ASGI server does, minus the sockets: the lifespan starts once, and every request gets
a shallow copy of the lifespan state. Tests that need the app (its metrics registry) or the
state (the ``Database`` its requests use) take them from here; the rest use conftest's
``app_client``, which is built on this.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI

from service.app import create_app
from service.settings import Settings
from service.state import AppState


@dataclass(frozen=True)
class Serving:
    app: FastAPI
    client: httpx.AsyncClient
    state: AppState


@asynccontextmanager
async def serving(
    settings: Settings,
    *,
    client_address: tuple[str, int] = ("127.0.0.1", 123),
    prepare: Callable[[FastAPI], None] | None = None,
) -> AsyncIterator[Serving]:
    """``prepare`` may add routes (a test's own endpoint that raises, say) before it starts."""
    app = create_app(settings)
    if prepare is not None:
        prepare(app)
    async with app.router.lifespan_context(app) as state:
        lifespan_state = dict(state or {})
        app_state = lifespan_state["app_state"]

        async def asgi(scope: Any, receive: Any, send: Any) -> None:
            scope["state"] = dict(lifespan_state)
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=asgi, client=client_address)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Serving(app, client, app_state)
