"""The innermost middleware: an exception nothing handled becomes a problem response."""

from __future__ import annotations

import structlog
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.http.problems import unexpected_error_response
from service.middleware.response_tracking import TrackedSend

log = structlog.get_logger("service.errors")


class CrashGuardMiddleware:
    """Turns an unhandled exception into a problem response instead of letting it escape.

    Starlette's ServerErrorMiddleware would answer too, but then re-raises so the server logs the
    traceback, which can contain SQL and values. This sits innermost among the middlewares so the
    access log and metrics see an ordinary 500.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if tracked.response_started:
                # Nothing can be sent any more; the server closes the connection.
                log.error("exception_after_response_started", error_type=type(exc).__name__)
                return
            response = unexpected_error_response(Request(scope), exc)
            await response(scope, receive, send)
