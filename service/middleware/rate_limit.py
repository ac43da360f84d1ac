"""Pure ASGI middleware applying the per-client-IP rate limit (``RATE_LIMIT_PER_IP``).

The client IP is ``scope["client"]``: behind a trusted proxy, uvicorn/gunicorn have already
replaced it with the address from ``X-Forwarded-For`` (``FORWARDED_ALLOW_IPS``); a header sent by
anyone else is ignored, so a client cannot pick its own bucket. The limiter itself lives on the
lifespan state (``rate_limiter``); without it (rate limiting off) this is a pass-through.
Health probes are never limited.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.http.problems import problem_response
from service.http.state import app_state_of
from service.middleware.probes import is_probe
from service.security.rate_limit import RateLimitedError


class ClientRateLimitMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_probe(scope["path"]):
            await self.app(scope, receive, send)
            return
        state = app_state_of(scope)
        limiter = state.rate_limiter if state is not None else None
        if limiter is None:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        exceeded = await limiter.check("ip", client[0] if client else "unknown")
        if exceeded is None:
            await self.app(scope, receive, send)
            return
        error = RateLimitedError(exceeded)
        response = problem_response(
            Request(scope),
            error.status,
            slug=error.slug,
            title=error.title,
            detail=error.detail,
            headers=error.headers,
        )
        await response(scope, receive, send)
