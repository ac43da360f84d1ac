"""The product app plus one test-only route, for gunicorn runs that need a slow request.

gunicorn loads ``slow_app:create_app_from_env()``: the real ``create_app`` with its real
middleware and lifespan; the extra route lives only in this test factory, never in the product.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from fastapi import FastAPI, Request

from service.app import create_app
from service.http.state import app_state
from service.settings import load_settings


def create_app_from_env() -> FastAPI:
    app = create_app(load_settings())

    @app.get("/_test/slow", include_in_schema=False)
    async def slow(request: Request, seconds: float = 1.0) -> dict[str, Any]:
        await asyncio.sleep(seconds)
        return {"pid": os.getpid(), "draining": app_state(request).lifecycle.draining}

    @app.get("/_test/block", include_in_schema=False)
    async def block(seconds: float = 1.0) -> dict[str, Any]:
        # Blocks the event loop, as sync code in an async route would: the worker stops
        # reporting to the master and gets killed after GUNICORN_TIMEOUT.
        time.sleep(seconds)
        return {"pid": os.getpid()}

    return app
