"""RFC 9457 problem details and the one place where domain errors become HTTP responses.

Layers below the routers raise ``DomainError`` subclasses; they never know about HTTP. Every error
response, including FastAPI's own validation errors and unexpected exceptions, leaves as
``application/problem+json``. A 500 carries the request id and nothing from the exception.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

import orjson
import sentry_sdk
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://fastapi-app.dev/problems/"
MAX_INSTANCE_LENGTH = 1024

log = structlog.get_logger("service.errors")


class ProblemFieldError(BaseModel):
    pointer: str = Field(examples=["#/title"], description="JSON pointer into the request")
    detail: str = Field(examples=["String should have at least 1 character"])


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = Field(examples=[PROBLEM_TYPE_BASE + "not-found"])
    title: str = Field(examples=["Not Found"])
    status: int = Field(examples=[404])
    detail: str | None = Field(None, examples=["Task not found"])
    instance: str | None = Field(None, examples=["/v1/tasks/0b6f8a4e-8f0e-4a4e-9c55-7b8f7c7f0c11"])
    request_id: str | None = Field(None, examples=["3f2b9c1e7a5d4c1f"])
    errors: list[ProblemFieldError] | None = None


class DomainError(Exception):
    """Base for errors raised below the HTTP layer; mapped to a status here only."""

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


def problem_response(
    request: Request | None,
    status: int,
    *,
    slug: str | None = None,
    title: str | None = None,
    detail: str | None = None,
    errors: Sequence[Mapping[str, str]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + (slug or phrase.lower().replace(" ", "-")),
        "title": title or phrase,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if request is not None:
        path = request.url.path
        # The path is the client's: an answer must not grow with it (the 414 for a long one).
        if len(path) <= MAX_INSTANCE_LENGTH:
            body["instance"] = path
        request_id = request.scope.get("state", {}).get("request_id")
        if request_id:
            body["request_id"] = request_id
    if errors:
        body["errors"] = list(errors)
    return Response(
        orjson.dumps(body), status_code=status, media_type=PROBLEM_CONTENT_TYPE, headers=headers
    )


def _pointer(loc: Sequence[int | str]) -> str:
    # FastAPI prefixes the location with where it came from ("body", "query", "path", "header").
    source, *path = loc if loc else ("body",)
    escaped = [str(part).replace("~", "~0").replace("/", "~1") for part in path]
    prefix = "#" if source == "body" else f"#/{source}"
    return "/".join([prefix, *escaped]) if escaped else prefix


# A 422 lists at most this many problems and says how many it left out: the answer to a body of
# 90,000 unknown fields must not be six times the size of the request.
MAX_LISTED_ERRORS = 20


def _validation_errors(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    return [
        {"pointer": _pointer(list(err.get("loc", ()))), "detail": str(err.get("msg", "invalid"))}
        for err in errors[:MAX_LISTED_ERRORS]
    ]


def _validation_detail(count: int) -> str:
    if count <= MAX_LISTED_ERRORS:
        return "The request has invalid fields; see errors"
    return (
        f"The request has {count} invalid fields; errors lists the first {MAX_LISTED_ERRORS}, "
        f"{count - MAX_LISTED_ERRORS} more were left out"
    )


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
    return type(exc).__name__ in _CONNECTION_ERROR_NAMES


def _driver_error(orig: BaseException) -> BaseException:
    # SQLAlchemy's asyncpg adapter re-raises the driver's exception as its own DB-API class
    # (``InterfaceError``, ``Error``) "from" the original: classify the original.
    cause = orig.__cause__
    return cause if cause is not None else orig


def install_exception_handlers(app: FastAPI) -> None:
    async def on_domain_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DomainError)
        return problem_response(
            request,
            exc.status,
            slug=exc.slug,
            title=exc.title,
            detail=exc.detail,
            headers=exc.headers,
        )

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        detail: str | None = exc.detail if isinstance(exc.detail, str) else None
        if detail == HTTPStatus(exc.status_code).phrase:
            detail = None
        return problem_response(request, exc.status_code, detail=detail, headers=exc.headers)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        raw = exc.errors()
        if any(err.get("type") == "json_invalid" for err in raw):
            return problem_response(
                request, 400, slug="malformed-json", detail="Request body is not valid JSON"
            )
        return problem_response(
            request,
            422,
            slug="validation-error",
            title="Validation failed",
            detail=_validation_detail(len(raw)),
            errors=_validation_errors(raw),
        )

    app.add_exception_handler(DomainError, on_domain_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)


def unexpected_error_response(request: Request, exc: BaseException) -> Response:
    """The response for an exception nothing else handled: 503 for a lost database, else 500."""
    if is_connection_error(exc):
        log.warning("database_unavailable", error_type=type(exc).__name__)
        return problem_response(
            request,
            503,
            slug="database-unavailable",
            detail="The database is unavailable; retry shortly",
            headers={"Retry-After": "2"},
        )
    if _is_statement_timeout(exc):
        log.warning("statement_timeout", where=_where(exc))
        return problem_response(
            request,
            503,
            slug="query-timeout",
            detail="The request took too long in the database; retry shortly",
            headers={"Retry-After": "2"},
        )
    # Only the exception's type and where it was raised reach the log: driver messages can carry
    # SQL and parameter values. The full traceback goes to Sentry when it is configured.
    sentry_sdk.capture_exception(exc)
    log.error("unhandled_exception", error_type=type(exc).__name__, where=_where(exc))
    return problem_response(
        request, 500, detail="An unexpected error occurred; quote the request_id"
    )


def _is_statement_timeout(exc: BaseException) -> bool:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    # asyncpg raises QueryCanceledError for statement_timeout; TimeoutError for command_timeout.
    return type(orig).__name__ == "QueryCanceledError" or isinstance(orig, TimeoutError)


def _where(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "unknown"
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}"


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
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if started:
                # Nothing can be sent any more; the server closes the connection.
                log.error("exception_after_response_started", error_type=type(exc).__name__)
                return
            response = unexpected_error_response(Request(scope), exc)
            await response(scope, receive, send)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting problem+json for the given statuses."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        phrase = HTTPStatus(status).phrase
        out[status] = {
            "description": phrase,
            "content": {
                PROBLEM_CONTENT_TYPE: {
                    "schema": {"$ref": "#/components/schemas/Problem"},
                    "example": {
                        "type": PROBLEM_TYPE_BASE + phrase.lower().replace(" ", "-"),
                        "title": phrase,
                        "status": status,
                        "instance": "/v1/tasks",
                    },
                }
            },
        }
    return out
