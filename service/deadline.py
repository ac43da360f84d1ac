"""How far a request got before its deadline: the one fact its answer depends on.

A request abandoned at its deadline (``REQUEST_TIMEOUT_SECONDS``,
service/middleware/deadline.py) is answered by what it was doing when time ran out:

- anything before its transaction's ``COMMIT`` was sent: nothing was applied (the transaction
  is rolled back with its connection), so the answer is a plain "retry": 503;
- the ``COMMIT`` itself: it may or may not have taken effect, and saying "not applied" could
  make a client create a task twice: 504, outcome unknown.

The database layer records the second case here (``commit_sending``); no web imports.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass


@dataclass(slots=True)
class RequestProgress:
    commit_sent: bool = False


_progress: ContextVar[RequestProgress | None] = ContextVar("request_progress", default=None)


def track() -> tuple[RequestProgress, Token[RequestProgress | None]]:
    """Start recording a request's progress (the deadline middleware, once per request)."""
    progress = RequestProgress()
    return progress, _progress.set(progress)


def untrack(token: Token[RequestProgress | None]) -> None:
    _progress.reset(token)


def commit_sending() -> None:
    """Called right before a request's ``COMMIT`` goes to the database."""
    progress = _progress.get()
    if progress is not None:
        progress.commit_sent = True
