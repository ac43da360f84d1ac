"""What the application holds while it runs: one typed object, never a bag of string keys.

``AppRuntime`` is what ``create_app`` builds (it exists before the first request and outside the
lifespan: the worker flips ``lifecycle.draining`` on it, the metrics server reads its registry).
``AppState`` adds what the lifespan opens (engines, authenticators, the rate limiter) and is the
lifespan state's one entry; Starlette hands it to every request (``service.http.state`` reads
it). Per-request values (request id, principal) are not here: they live in each request's
scope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from service.db import Database
    from service.lifecycle import Lifecycle
    from service.observability.metrics import Metrics
    from service.security.api_keys import ApiKeyAuthenticator
    from service.security.jwt import JwtVerifier
    from service.security.rate_limit import RateLimiter
    from service.settings import Settings

APP_STATE_KEY = "app_state"
RUNTIME_ATTRIBUTE = "runtime"


@dataclass(frozen=True, slots=True)
class AppRuntime:
    settings: Settings
    lifecycle: Lifecycle
    metrics: Metrics


@dataclass(frozen=True, slots=True)
class AppState:
    runtime: AppRuntime
    database: Database
    schema_heads: set[str]
    api_keys: ApiKeyAuthenticator
    # None when not configured; authentication then accepts API keys only.
    jwt_verifier: JwtVerifier | None
    # None when RATE_LIMIT_ENABLED=false.
    rate_limiter: RateLimiter | None

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def lifecycle(self) -> Lifecycle:
        return self.runtime.lifecycle

    @property
    def metrics(self) -> Metrics:
        return self.runtime.metrics


class LifespanState(TypedDict):
    """The lifespan's state (Starlette copies it into each request's ``scope["state"]``)."""

    app_state: AppState


def runtime_of(app: object) -> AppRuntime | None:
    """The runtime ``create_app`` put on the app, or None for an app it did not build.

    Duck-typed so the gunicorn worker (loaded in the master) needs no web import to find it.
    """
    runtime = getattr(getattr(app, "state", None), RUNTIME_ATTRIBUTE, None)
    return runtime if isinstance(runtime, AppRuntime) else None
