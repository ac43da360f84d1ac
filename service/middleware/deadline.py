"""A total time limit per request, below the proxy's read timeout (pure ASGI).

Every bound below the HTTP layer (pool checkout, connect, statement, rollback) is finite, but a
request can meet several in a row (the API-key lookup's, then its own; many slow round trips
on a slow link) and outlive nginx's ``proxy_read_timeout``: the client then gets nginx's bare
504 and learns nothing (the failure lab found 0-3 per outage). ``REQUEST_TIMEOUT_SECONDS``
ends the request first and answers it here:

- 503 problem+json with ``Retry-After`` when the request had not sent its ``COMMIT``: it was
  abandoned and nothing was applied (a write's transaction dies with its connection);
- 504 problem+json (``commit-outcome-unknown``, as service/db.py answers a COMMIT that got
  no answer) when time ran out while the ``COMMIT`` was in flight: the write may or may not
  have been applied. A retry with the same ``Idempotency-Key`` answers which (a replay of the
  stored 201, a 409 while the first attempt is still finishing, or a fresh create if it never
  committed).

Cancelling the handler frees what it held: the database layer drops (never pools) a connection
whose statement was cancelled (service/db.py, ``rollback_or_discard`` and ``_reader``), since
its state on the server (and on PgBouncer) is unknown. That clean-up runs before the answer
goes out and is itself bounded (≤ 2 s: SQLAlchemy's close of an invalidated connection), which
is why the default leaves margin below nginx's read timeout (docs/reliability.md).
"""

from __future__ import annotations

import asyncio

import structlog
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service import deadline
from service.errors import CommitOutcomeUnknownError
from service.http.problems import problem_response
from service.middleware.response_tracking import TrackedSend

log = structlog.get_logger("service.deadline")
RETRY_AFTER_SECONDS = "2"


class RequestDeadlineMiddleware:
    def __init__(self, app: ASGIApp, *, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.seconds:
            await self.app(scope, receive, send)
            return
        tracked = TrackedSend(send)

        progress, token = deadline.track()
        limit = asyncio.timeout(self.seconds)
        try:
            async with limit:
                await self.app(scope, receive, tracked)
        except TimeoutError:
            if not limit.expired():
                raise  # someone else's timeout, not the deadline
            log.warning(
                "request_deadline_exceeded",
                limit_s=self.seconds,
                commit_sent=progress.commit_sent,
                response_started=tracked.response_started,
            )
            if tracked.response_started:
                return  # nothing more can be said; the server closes the connection
            await self._answer(scope, receive, send, commit_sent=progress.commit_sent)
        finally:
            deadline.untrack(token)

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, *, commit_sent: bool
    ) -> None:
        seconds = f"{self.seconds:g}"
        if commit_sent:
            response = problem_response(
                Request(scope),
                504,
                slug=CommitOutcomeUnknownError.slug,
                detail=f"The request ran out of time ({seconds} s) while its changes were being "
                "committed: they may or may not have been applied. Retry with the same "
                "Idempotency-Key to find out (or read before retrying without one)",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        else:
            response = problem_response(
                Request(scope),
                503,
                slug="request-timeout",
                detail=f"The request did not finish within {seconds} s and was abandoned; "
                "nothing was applied. Retry shortly",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        await response(scope, receive, send)
