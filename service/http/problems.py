"""RFC 9457 problem details: the one shape every error response takes.

Every error response, including FastAPI's own validation errors and unexpected exceptions, leaves
as ``application/problem+json``. A 500 carries the request id and nothing from the exception.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

import orjson
import structlog
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import Response

from service.errors import is_connection_error, is_statement_timeout
from service.http.state import request_id
from service.sentry import capture_exception

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
        known_id = request_id(request.scope)
        if known_id:
            body["request_id"] = known_id
    if errors:
        body["errors"] = list(errors)
    return Response(
        orjson.dumps(body), status_code=status, media_type=PROBLEM_CONTENT_TYPE, headers=headers
    )


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
    if is_statement_timeout(exc):
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
    capture_exception(exc)
    log.error("unhandled_exception", error_type=type(exc).__name__, where=_where(exc))
    return problem_response(
        request, 500, detail="An unexpected error occurred; quote the request_id"
    )


def _where(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "unknown"
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}"


# Statuses this API uses for one thing only: documented as that thing, not by their phrase.
_MEANINGS = {
    504: (
        "commit-outcome-unknown",
        "The COMMIT got no answer (the database stopped answering, or the request deadline "
        "passed while it was in flight): the write may or may not have been applied. Retry "
        "with the same Idempotency-Key to find out.",
    ),
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting problem+json for the given statuses."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        phrase = HTTPStatus(status).phrase
        slug, description = _MEANINGS.get(status, (phrase.lower().replace(" ", "-"), phrase))
        out[status] = {
            "description": description,
            "content": {
                PROBLEM_CONTENT_TYPE: {
                    "schema": {"$ref": "#/components/schemas/Problem"},
                    "example": {
                        "type": PROBLEM_TYPE_BASE + slug,
                        "title": phrase,
                        "status": status,
                        "instance": "/v1/tasks",
                    },
                }
            },
        }
    return out
