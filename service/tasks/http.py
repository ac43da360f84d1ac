"""HTTP details of the tasks routes that are not the domain: media types, ids in paths, and
the conditional and idempotency request headers, each declared once so that OpenAPI documents
them as parameters."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Header, Request
from fastapi.exceptions import RequestValidationError

from service.errors import DomainError, NotFoundError
from service.idempotency.store import parse_idempotency_key
from service.tasks.etag import MAX_ENTITY_TAGS

JSON = "application/json"
MERGE_PATCH_JSON = "application/merge-patch+json"
UUID_TEXT_LENGTH = 36
# What json.detect_encoding answers for UTF-8, with and without a byte order mark.
UTF8_ENCODINGS = frozenset({"utf-8", "utf-8-sig"})


class UnsupportedMediaTypeError(DomainError):
    status, slug = 415, "unsupported-media-type"


def require_media_type(*accepted: str, advertise: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency refusing request bodies in any other media type with 415.

    ``advertise`` names the response header listing what is accepted (``Accept-Post`` or
    ``Accept-Patch``, RFC 5789). JSON is UTF-8 (RFC 8259), so another charset is refused too,
    declared or not: the JSON parser would otherwise recognise a UTF-16 or UTF-32 body by its
    byte pattern and take it.
    """
    listed = ", ".join(accepted)

    async def check(request: Request) -> None:
        content_type = request.headers.get("content-type", "")
        media_type, *params = (part.strip().lower() for part in content_type.split(";"))
        charset = next(
            (p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")), "utf-8"
        )
        if media_type not in accepted or charset != "utf-8":
            raise UnsupportedMediaTypeError(
                f"Send the body as {' or '.join(accepted)}", headers={advertise: listed}
            )
        # The body is already read and cached by now; json.detect_encoding looks at 4 bytes.
        if json.detect_encoding(await request.body()) not in UTF8_ENCODINGS:
            raise UnsupportedMediaTypeError(
                "JSON must be encoded as UTF-8 (RFC 8259)", headers={advertise: listed}
            )

    return check


def task_uuid(raw: str) -> uuid.UUID:
    """The task id from the path; anything that is not a UUID is a task that does not exist.

    Ids are opaque to clients, so a malformed one is a 404 like any other unknown id rather
    than a 422 that would describe our id format.
    """
    if len(raw) == UUID_TEXT_LENGTH:
        try:
            return uuid.UUID(raw)
        except ValueError:
            pass
    raise NotFoundError("Task not found")


def idempotency_key(raw: str | None) -> str | None:
    """The validated ``Idempotency-Key``; a malformed one is a 422 like any invalid field."""
    if raw is None:
        return None
    key = parse_idempotency_key(raw)
    if key is None:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("header", "Idempotency-Key"),
                    "msg": "must be 1-255 printable ASCII characters",
                    "input": raw,
                }
            ]
        )
    return key


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description=(
            "Makes the request safe to retry (IETF httpapi idempotency-key draft): 1-255 "
            "printable ASCII characters, e.g. a UUID, bare or as a quoted Structured Field "
            "string. The same key with the same body replays the first response (with "
            "`Idempotent-Replayed: true`) for at least 24 hours; with a different body it is "
            "a 422; while the first request is still running it is a 409."
        ),
        examples=["8e03978e-40d5-43e8-bc93-6894a57f9324"],
    ),
]
IfMatchHeader = Annotated[
    str | None,
    Header(
        alias="If-Match",
        description="Apply only if the task's current ETag is one of these (or `*`); else "
        f"412. At most {MAX_ENTITY_TAGS} entity tags (more: 400).",
        examples=['"3"'],
    ),
]
IfNoneMatchHeader = Annotated[
    str | None,
    Header(
        alias="If-None-Match",
        description="Answer 304 Not Modified if the task's current ETag is one of these. At "
        f"most {MAX_ENTITY_TAGS} entity tags (more: 400).",
        examples=['"3"'],
    ),
]
