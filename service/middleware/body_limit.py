"""Request body size limit, enforced while the body streams in (pure ASGI).

A declared ``Content-Length`` over the limit is refused with 413 before the app runs and before
a byte of the body is read. A chunked (or understated) body is counted as it is received and the
read that crosses the limit raises a 413 ``HTTPException``: FastAPI's body parsing re-raises
HTTP exceptions unchanged, so the app's handler answers problem+json, and a 413 that escapes
anyway is answered here. Nothing beyond the limit is buffered; uvicorn stops reading from the
socket while the app does not ask for more (flow control), and closes the connection after the
response because the body was not consumed.

Why not FastAPI's own ``max_body_size``: it streams too, but it wraps all user middleware, so its
413 is ``text/plain`` and bypasses the request id, access log, metrics and security headers.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import problem_response

_CONTENT_LENGTH = b"content-length"


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


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
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
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError as exc:
            if response_started:
                raise
            response = problem_response(Request(scope), 413, detail=str(exc.detail))
            await response(scope, receive, send)
