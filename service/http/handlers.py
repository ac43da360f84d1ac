"""Exception handlers: domain errors, HTTP errors and validation errors become problem+json."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.errors import DomainError
from service.http.problems import problem_response


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
