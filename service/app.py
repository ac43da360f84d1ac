"""``create_app(settings)``: the only place the application is assembled.

Nothing is built at import. The lifespan opens the database engines and keeps every long-lived
object on the lifespan state, which Starlette copies onto each ``request.state``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service import health
from service.db import Database
from service.errors import CrashGuardMiddleware, Problem, install_exception_handlers
from service.lifecycle import Lifecycle
from service.migrate import head_revisions
from service.security.api_keys import ApiKeyAuthenticator
from service.settings import Settings, load_settings
from service.tasks.router import router as tasks_router

API_DESCRIPTION = """
An owner-scoped Tasks API. Every `/v1` route needs a credential: an API key in `X-API-Key`
(or `Authorization: Bearer <key>`), or a JWT bearer token when JWT verification is configured.
Errors are [RFC 9457](https://www.rfc-editor.org/rfc/rfc9457) `application/problem+json`.
"""


def create_app(settings: Settings) -> FastAPI:
    lifecycle = Lifecycle()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        database = Database(settings)
        state: dict[str, Any] = {
            "settings": settings,
            "lifecycle": lifecycle,
            "database": database,
            "schema_heads": head_revisions(),
            "api_keys": ApiKeyAuthenticator(
                database.sessionmaker, ttl_seconds=settings.api_key_cache_ttl_seconds
            ),
        }
        try:
            yield state
        finally:
            lifecycle.draining = True
            await database.dispose()

    app = FastAPI(
        title="fastapi-app Tasks API",
        version=settings.version,
        description=API_DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs" if settings.show_docs else None,
        redoc_url="/redoc" if settings.show_docs else None,
        # The schema stays available for gateway import (Zuplo, Kong) even with docs off.
        openapi_url="/openapi.json",
        debug=False,
    )
    app.state.settings = settings
    app.state.lifecycle = lifecycle

    install_exception_handlers(app)
    _install_middleware(app, settings)

    app.include_router(health.router)
    app.include_router(tasks_router)
    _install_openapi(app)
    return app


def _install_middleware(app: FastAPI, settings: Settings) -> None:
    """The middleware stack, listed innermost first (Starlette wraps each new one around the
    previous). All are pure ASGI: no BaseHTTPMiddleware on the hot path.

    Outermost to innermost, a request meets: request id -> access log & metrics -> security
    headers -> trusted host -> CORS -> gateway secret -> body limit -> rate limit (per IP) ->
    crash guard -> routing. Per-principal rate limits run in the auth dependency, after the
    credential is verified.
    """
    # Innermost: turns unhandled exceptions into problem+json so everything outside sees a 500.
    app.add_middleware(CrashGuardMiddleware)


def _install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=[
                {"name": "tasks", "description": "Your tasks. Another owner's task is a 404."},
                {"name": "health", "description": "Probes for load balancers and Kubernetes."},
            ],
        )
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in schemas["Problem"].pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app_from_env() -> FastAPI:
    """Factory for servers that take an import string (gunicorn, uvicorn ``--factory``)."""
    return create_app(load_settings())
