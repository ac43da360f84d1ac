"""Request and correlation ids: taken from the caller when well-formed, else generated.

``X-Request-ID`` identifies this hop; ``X-Correlation-ID`` follows a whole transaction across
services. A valid incoming ``X-Request-ID`` is reused (the gateway's id then matches ours), else a
valid ``X-Correlation-ID`` is, else a fresh uuid4 hex. The correlation id is the caller's when
given, else the request id. Both are echoed in the response, bound to every log line of the
request (structlog context variables) and stored in ``scope["state"]`` where the problem+json
bodies and outgoing calls find them.

Ids are validated (8-128 characters of ``[A-Za-z0-9._:-]``) because they are copied into log
lines and response headers: an unchecked value could forge log fields or be used to smuggle
headers. nginx (nginx/templates) applies the same rule before it forwards or generates an id, so
the id a client sees in the response header is the one in the body and in every log line; a
deploy test keeps the two patterns identical.
"""

from __future__ import annotations

import re
import uuid

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.state import set_request_ids

REQUEST_ID_HEADER = b"x-request-id"
CORRELATION_ID_HEADER = b"x-correlation-id"
# The one rule for a usable incoming id, shared with nginx's ``map $http_x_request_id``.
VALID_ID_PATTERN = r"[A-Za-z0-9._:-]{8,128}"
_VALID_ID = re.compile(VALID_ID_PATTERN.encode("ascii"))


def valid_id(raw: bytes | None) -> str | None:
    if raw is not None and _VALID_ID.fullmatch(raw):
        return raw.decode("ascii")
    return None


def pick_ids(headers: list[tuple[bytes, bytes]]) -> tuple[str, str]:
    """(request id, correlation id) for a request with these raw headers."""
    incoming_request_id: bytes | None = None
    incoming_correlation_id: bytes | None = None
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            incoming_request_id = value
        elif name == CORRELATION_ID_HEADER:
            incoming_correlation_id = value
    correlation_id = valid_id(incoming_correlation_id)
    request_id = valid_id(incoming_request_id) or correlation_id or uuid.uuid4().hex
    return request_id, correlation_id or request_id


class RequestIdMiddleware:
    """Outermost middleware: every response, including errors from other middleware, has ids."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id, correlation_id = pick_ids(scope["headers"])
        set_request_ids(scope, request_id, correlation_id)
        extra_headers = [
            (REQUEST_ID_HEADER, request_id.encode()),
            (CORRELATION_ID_HEADER, correlation_id.encode()),
        ]

        async def send_with_ids(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra_headers]
            await send(message)

        fields = {"request_id": request_id}
        if correlation_id != request_id:
            fields["correlation_id"] = correlation_id
        tokens = structlog.contextvars.bind_contextvars(**fields)
        try:
            await self.app(scope, receive, send_with_ids)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)
