"""Size limits on what a client sends, enforced before anything parses it (pure ASGI).

- The request target (path and query string) is at most ``MAX_TARGET_BYTES``: 414. A query
  string of 100,000 parameters would otherwise be split and decoded on every request.
- The header section is at most ``MAX_HEADER_BYTES`` in total: 431. uvicorn's httptools parser
  sets no limit of its own (nginx does, at 4 x 8 KiB, which these figures match).
- The body is at most ``MAX_REQUEST_BODY_BYTES``. A declared ``Content-Length`` over the limit
  is refused with 413 before the app runs and before a byte of the body is read. A chunked (or
  understated) body is counted as it is received and the read that crosses the limit raises a
  413 ``HTTPException``: FastAPI's body parsing re-raises HTTP exceptions unchanged, so the
  app's handler answers problem+json, and a 413 that escapes anyway is answered here. Nothing
  beyond the limit is buffered; uvicorn stops reading from the socket while the app does not
  ask for more (flow control), and closes the connection after the response because the body
  was not consumed.

Why not FastAPI's own ``max_body_size``: it streams too, but it wraps all user middleware, so its
413 is ``text/plain`` and bypasses the request id, access log, metrics and security headers.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.problems import problem_response
from service.middleware.response_tracking import TrackedSend

_CONTENT_LENGTH = b"content-length"
MAX_TARGET_BYTES = 8 * 1024
MAX_HEADER_BYTES = 32 * 1024


class BodyTooLargeError(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, detail=f"The request body exceeds {limit} bytes")


def declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == _CONTENT_LENGTH:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def target_bytes(scope: Scope) -> int:
    raw_path: bytes | None = scope.get("raw_path")
    path = len(raw_path) if raw_path is not None else len(scope["path"].encode())
    return path + 1 + len(scope["query_string"])


def header_bytes(scope: Scope) -> int:
    # As on the wire: "name: value\r\n". A plain loop: a third cheaper than sum() over a
    # generator, and it runs on every request.
    headers = scope["headers"]
    total = 4 * len(headers)
    for name, value in headers:
        total += len(name) + len(value)
    return total


class RequestLimitsMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if target_bytes(scope) > MAX_TARGET_BYTES:
            detail = f"The request target (path and query) exceeds {MAX_TARGET_BYTES} bytes"
            await problem_response(Request(scope), 414, detail=detail)(scope, receive, send)
            return
        if header_bytes(scope) > MAX_HEADER_BYTES:
            detail = f"The request headers exceed {MAX_HEADER_BYTES} bytes in total"
            await problem_response(Request(scope), 431, detail=detail)(scope, receive, send)
            return
        limit = self.limit
        length = declared_length(scope)
        if length is not None and length > limit:
            response = problem_response(
                Request(scope), 413, detail=f"The request body exceeds {limit} bytes"
            )
            await response(scope, receive, send)
            return

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        tracked = TrackedSend(send)
        try:
            await self.app(scope, counting_receive, tracked)
        except BodyTooLargeError as exc:
            if tracked.response_started:
                raise
            response = problem_response(Request(scope), 413, detail=str(exc.detail))
            await response(scope, receive, send)
