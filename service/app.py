"""``create_app(settings)``: the only place the application is assembled.

Nothing is built at import. The lifespan opens the database engines and keeps every long-lived
object in one ``AppState`` (service/state.py), the lifespan state's one entry, which Starlette
hands to each request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service import health
from service.db import Database
from service.http.handlers import install_exception_handlers
from service.http.problems import Problem
from service.lifecycle import Lifecycle
from service.middleware.access_log import AccessLogMiddleware
from service.middleware.cors import ProblemCORSMiddleware
from service.middleware.crash_guard import CrashGuardMiddleware
from service.middleware.deadline import RequestDeadlineMiddleware
from service.middleware.gateway import GatewaySecretMiddleware
from service.middleware.rate_limit import ClientRateLimitMiddleware
from service.middleware.request_limits import RequestLimitsMiddleware
from service.middleware.security_headers import SecurityHeadersMiddleware
from service.middleware.trusted_host import TrustedHostsMiddleware
from service.migrate import head_revisions
from service.observability.logging import configure_logging, direct_logger
from service.observability.loop_lag import loop_lag_monitor
from service.observability.metrics import Metrics
from service.observability.request_id import RequestIdMiddleware
from service.security.api_keys import ApiKeyAuthenticator
from service.security.dependencies import document_credentials
from service.security.gateway import GatewaySecrets
from service.security.gateway_identity import GatewayIdentity
from service.security.jwt import build_jwt_verifier
from service.security.rate_limit import build_rate_limiter
from service.sentry import init_sentry
from service.settings import Settings, load_settings
from service.state import RUNTIME_ATTRIBUTE, AppRuntime, AppState, LifespanState
from service.tasks.router import router as tasks_router

log = structlog.get_logger("service.app")

API_DESCRIPTION = """
An owner-scoped Tasks API. Every `/v1` route needs a credential: an API key in `X-API-Key`
(or `Authorization: Bearer <key>`), or a JWT bearer token when JWT verification is configured.
Errors are [RFC 9457](https://www.rfc-editor.org/rfc/rfc9457) `application/problem+json`.
"""


def create_app(settings: Settings) -> FastAPI:
    # Logging and Sentry are process-wide by nature; configuring them again (tests build many
    # apps) replaces the previous configuration.
    log_handler = configure_logging(settings)
    init_sentry(settings)
    runtime = AppRuntime(settings=settings, lifecycle=Lifecycle(), metrics=Metrics(settings))
    metrics = runtime.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[LifespanState]:
        database = Database(
            settings,
            on_connect_retry=metrics.connect_retried,
            on_read_routed=metrics.read_routed,
            on_replica_status=metrics.replica_status,
            on_query=metrics.db_query_duration.observe,
        )
        metrics.instrument_engine(database.engine, pool_gauges=True)
        if database.read_engine is not database.engine:
            metrics.instrument_engine(database.read_engine, pool_gauges=False)
        await database.start()
        state = AppState(
            runtime=runtime,
            database=database,
            schema_heads=head_revisions(),
            api_keys=ApiKeyAuthenticator(
                database.sessionmaker,
                ttl_seconds=settings.api_key_cache_ttl_seconds,
                connect=database.connect_session,
            ),
            jwt_verifier=build_jwt_verifier(settings),
            # Metrics hooks: on_exceeded(scope) and on_backend_error()
            # (rate_limit_exceeded_total / rate_limit_backend_errors_total).
            rate_limiter=build_rate_limiter(
                settings,
                on_exceeded=metrics.rate_limited,
                on_backend_error=metrics.rate_limit_backend_failed,
            ),
        )
        log.info("app_started", version=settings.version, environment=settings.environment.value)
        try:
            async with loop_lag_monitor(metrics.loop_lag_observed):
                yield {"app_state": state}
        finally:
            runtime.lifecycle.draining = True
            for closable in (state.jwt_verifier, state.rate_limiter):
                if closable is not None:
                    await closable.aclose()
            await database.dispose()
            log.info("app_stopped")

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
        # Starlette would answer /v1/tasks/ with a redirect built from the Host header (an open
        # redirect while ALLOWED_HOSTS is "*"); an unmatched path is the 404 problem instead.
        redirect_slashes=False,
    )
    # Outside the lifespan too: the worker drains through it, the metrics server reads it.
    setattr(app.state, RUNTIME_ATTRIBUTE, runtime)

    install_exception_handlers(app)
    _install_middleware(app, runtime, log_handler)

    app.include_router(health.router)
    app.include_router(tasks_router)
    _install_openapi(app)
    return app


CORS_ALLOW_HEADERS = [
    "Authorization",
    "Consistency-Token",
    "Content-Type",
    "Idempotency-Key",
    "If-Match",
    "If-None-Match",
    "X-API-Key",
    "X-Correlation-ID",
    "X-Request-ID",
]
CORS_EXPOSE_HEADERS = [
    "Accept-Patch",
    "Accept-Post",
    "Consistency-Token",
    "ETag",
    "Idempotent-Replayed",
    "Location",
    "Retry-After",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "X-Correlation-ID",
    "X-Request-ID",
]


def _install_middleware(
    app: FastAPI,
    runtime: AppRuntime,
    log_handler: logging.StreamHandler,  # type: ignore[type-arg]
) -> None:
    """The middleware stack, listed innermost first (Starlette wraps each new one around the
    previous). All are pure ASGI: no BaseHTTPMiddleware on the hot path.

    Outermost to innermost, a request meets: request id -> access log & metrics -> security
    headers -> trusted host -> CORS -> gateway secret -> request limits -> request deadline ->
    rate limit (per IP) -> crash guard -> routing. Per-principal rate limits run in the auth
    dependency, after the credential is verified.
    """
    settings = runtime.settings
    # Innermost: turns unhandled exceptions into problem+json so everything outside sees a 500.
    app.add_middleware(CrashGuardMiddleware)
    # Per client IP; reads the limiter from the lifespan state (a pass-through when disabled).
    app.add_middleware(ClientRateLimitMiddleware)
    # Every request that does work ends by REQUEST_TIMEOUT_SECONDS, answered by the app
    # (503/504 problem+json) before the proxy's read timeout would answer a bare 504.
    app.add_middleware(RequestDeadlineMiddleware, seconds=settings.request_timeout_seconds)
    # Bounds what a client sends before anything parses it: the request target (414), the
    # header section (431) and the body, counted as it streams in (413).
    app.add_middleware(RequestLimitsMiddleware, max_body_bytes=settings.max_request_body_bytes)
    # Before anything that does work: a request that bypassed the gateway costs nothing more.
    gateway_secrets = GatewaySecrets.from_settings(settings)
    if gateway_secrets is not None:
        app.add_middleware(
            GatewaySecretMiddleware,
            secrets=gateway_secrets,
            identity=GatewayIdentity.from_settings(settings),
        )
    if settings.cors_origins:
        # Outside the gateway check: a browser's preflight carries no gateway header.
        app.add_middleware(
            ProblemCORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=True,
            allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=CORS_ALLOW_HEADERS,
            expose_headers=CORS_EXPOSE_HEADERS,
            max_age=600,
        )
    if "*" not in settings.allowed_hosts:
        app.add_middleware(TrustedHostsMiddleware, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(
        SecurityHeadersMiddleware,
        hsts=settings.is_production_like,
        docs_paths=[path for path in (app.docs_url, app.redoc_url) if path],
    )
    app.add_middleware(
        AccessLogMiddleware,
        metrics=runtime.metrics,
        logger=direct_logger(runtime.settings, log_handler, "service.access"),
    )
    # Outermost: every response, even another middleware's refusal, carries the request id.
    app.add_middleware(RequestIdMiddleware)


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
        document_credentials(schema, "/v1/")
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
