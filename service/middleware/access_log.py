"""One access log line and the HTTP metrics for every request, in one pure ASGI middleware.

It sits just inside the request-id middleware, so it sees every response, including the errors
other middleware produce (trusted host, gateway, body limit, rate limit), and the request id is
already bound to the log line. The route label is read after the app ran: the router stores the
matched route in the scope, so the label is the template (``/v1/tasks/{task_id}``), never the raw
path, and requests matching no route share one label value.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.state import principal
from service.observability.metrics import UNMATCHED_ROUTE, Metrics, normalise_method

# nginx's code for "client closed the connection before a response was sent".
CLIENT_CLOSED = 499
# The path is the client's; a line per request must not grow with it (a 414 is logged too).
MAX_LOGGED_PATH = 1024


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    if route is None:
        return UNMATCHED_ROUTE
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) and template else UNMATCHED_ROUTE


def logged_path(path: str) -> str:
    return path if len(path) <= MAX_LOGGED_PATH else path[:MAX_LOGGED_PATH] + "..."


def principal_id(scope: Scope) -> str | None:
    found = principal(scope)
    return found.credential_id if found is not None else None


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, *, logger: Any, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.log = logger  # observability.logging.direct_logger("service.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = normalise_method(scope["method"])
        status = CLIENT_CLOSED
        metrics = self.metrics
        if metrics is not None:
            metrics.request_started(method)

        async def send_recording_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording_status)
        except BaseException:
            status = 500
            raise
        finally:
            elapsed = time.perf_counter() - started
            route = route_template(scope)
            if metrics is not None:
                metrics.request_finished(method, route, status, elapsed)
            client = scope.get("client")
            emit = self.log.warning if status >= 500 else self.log.info
            emit(
                "request",
                method=scope["method"],
                route=route,
                path=logged_path(scope["path"]),
                status=status,
                duration_ms=round(elapsed * 1000, 2),
                client_ip=client[0] if client else None,
                principal=principal_id(scope),
            )
