"""Domain errors and the classification of database failures; nothing here knows about HTTP.

Layers below the routers raise ``DomainError`` subclasses. Each carries the status and problem
type it stands for, so the HTTP layer (``service.http.handlers``) maps every one of them to an
RFC 9457 problem+json response in one place.
"""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg
from sqlalchemy.exc import DBAPIError, EmulatedDBAPIException, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError


class DomainError(Exception):
    """Base for errors raised below the HTTP layer; becomes a response in the HTTP layer only."""

    status: int = 400
    slug: str = "bad-request"
    title: str | None = None
    headers: Mapping[str, str] = {}

    def __init__(self, detail: str | None = None, *, headers: Mapping[str, str] | None = None):
        super().__init__(detail or self.title or "")
        self.detail = detail
        if headers:
            self.headers = dict(headers)


class NotFoundError(DomainError):
    status, slug = 404, "not-found"


class ConflictError(DomainError):
    status, slug = 409, "conflict"


class PreconditionFailedError(DomainError):
    status, slug = 412, "precondition-failed"


class UnprocessableError(DomainError):
    status, slug = 422, "unprocessable-content"


class UnauthorizedError(DomainError):
    status, slug = 401, "unauthorized"

    def __init__(self, detail: str | None = None, *, error: str | None = "invalid_token") -> None:
        # RFC 6750 section 3.1: a request that sent no credential gets the challenge without an
        # error code; a bad credential gets error="invalid_token".
        code = f', error="{error}"' if error else ""
        super().__init__(
            detail,
            headers={"WWW-Authenticate": f'Bearer realm="fastapi-app"{code}, ApiKey'},
        )


class ForbiddenError(DomainError):
    status, slug = 403, "forbidden"


class ServiceUnavailableError(DomainError):
    status, slug = 503, "service-unavailable"

    def __init__(self, detail: str | None = None, *, retry_after: int = 2) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class CommitOutcomeUnknownError(DomainError):
    """The COMMIT was sent and no answer came back (the link died, the client-side timeout or
    the request deadline fired): the write may or may not have been applied. Saying "failed"
    could make a client create it twice; the same Idempotency-Key on the retry settles it."""

    status, slug = 504, "commit-outcome-unknown"
    DETAIL = (
        "The changes were being committed when the database stopped answering: they may or "
        "may not have been applied. Retry with the same Idempotency-Key to find out (or read "
        "before retrying without one)"
    )

    def __init__(self, detail: str | None = None, *, retry_after: int = 2) -> None:
        super().__init__(detail or self.DETAIL, headers={"Retry-After": str(retry_after)})


# The driver's own classes for "the database could not be reached or dropped us". Not its
# InterfaceError as such: asyncpg raises that for misuse too (more than 32,767 bind parameters),
# and a statement a client caused must never be reported as an outage.
_CONNECTION_ERROR_NAMES = frozenset(
    {
        "ConnectionDoesNotExistError",
        "CannotConnectNowError",
        "TooManyConnectionsError",
        "ConnectionFailureError",
        "ConnectionRejectionError",
        "PostgresConnectionError",
        "AdminShutdownError",
        "CrashShutdownError",
    }
)


def is_connection_error(exc: BaseException) -> bool:
    """True when the database could not be reached (as opposed to a bad statement)."""
    if isinstance(exc, PoolTimeoutError | ConnectionError | OSError | TimeoutError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated or isinstance(exc, OperationalError):
            return True
        return exc.orig is not None and is_connection_error(_driver_error(exc.orig))
    if isinstance(exc, EmulatedDBAPIException):
        # The adapter's DB-API class unwrapped: a raw pool checkout (the read path) has no
        # engine Connection to turn it into a DBAPIError. Classified as the engine would.
        if type(exc).__name__ == "OperationalError":
            return True
        cause = exc.__cause__
        return cause is not None and is_connection_error(cause)
    return type(exc).__name__ in _CONNECTION_ERROR_NAMES


def answered_by_server(error: BaseException) -> bool:
    """Did the server (or PgBouncer) answer with ``error``, so the connection it came from is in
    a known state? asyncpg's own error classes, minus those meaning the link is gone."""
    return isinstance(error, asyncpg.PostgresError) and not is_connection_error(error)


def _driver_error(orig: BaseException) -> BaseException:
    # SQLAlchemy's asyncpg adapter re-raises the driver's exception as its own DB-API class
    # (``InterfaceError``, ``Error``) "from" the original: classify the original.
    cause = orig.__cause__
    return cause if cause is not None else orig


def is_statement_timeout(exc: BaseException) -> bool:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    # asyncpg raises QueryCanceledError for statement_timeout; TimeoutError for command_timeout.
    return type(orig).__name__ == "QueryCanceledError" or isinstance(orig, TimeoutError)
