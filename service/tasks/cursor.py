"""Opaque keyset cursors for ``GET /v1/tasks``.

A cursor is base64url (unpadded) of a small JSON document: the sort it belongs to, a
fingerprint of the filters, and the sort key of the last task on the page. The next page is
"everything after that key", so a page boundary never moves when tasks are inserted: no task is
skipped or repeated while paging (a task whose sort key itself changes, by a PATCH of its
``due_at`` or ``priority``, can of course move across the boundary).

Cursors are not signed: they address nothing but a position inside the caller's own tasks, and
every query is owner-scoped, so a forged cursor can only skip around the caller's own data.
Anything malformed, or a cursor reused with another sort or other filters, is a 400.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from service.errors import DomainError
from service.tasks.sorting import KEY_SHAPES, TaskSort

CURSOR_VERSION = 1
MAX_CURSOR_LENGTH = 512
MAX_RANK = 3

KeyValue = datetime | uuid.UUID | int | None
SortKey = tuple[KeyValue, ...]


class InvalidCursorError(DomainError):
    status, slug, title = 400, "invalid-cursor", "Invalid cursor"


def filters_fingerprint(filters: dict[str, Any]) -> str:
    """A short digest of the list filters, so a cursor cannot be replayed under other ones."""
    canonical = orjson.dumps(filters, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:16]


def _encode_value(value: KeyValue) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def encode_cursor(sort: TaskSort, filters: str, key: SortKey) -> str:
    document = {
        "v": CURSOR_VERSION,
        "s": sort.value,
        "f": filters,
        "k": [_encode_value(value) for value in key],
    }
    return base64.urlsafe_b64encode(orjson.dumps(document)).rstrip(b"=").decode("ascii")


def _decode_value(shape: str, raw: Any) -> KeyValue:
    if shape == "id":
        if not isinstance(raw, str):
            raise ValueError("id")
        return uuid.UUID(raw)
    if shape == "rank":
        if type(raw) is not int or not 0 <= raw <= MAX_RANK:
            raise ValueError("rank")
        return raw
    if raw is None and shape == "ts?":
        return None
    if not isinstance(raw, str):
        raise ValueError("timestamp")
    value = datetime.fromisoformat(raw)
    if value.tzinfo is None:
        raise ValueError("timestamp without offset")
    return value.astimezone(UTC)


def decode_cursor(token: str, sort: TaskSort, filters: str) -> SortKey:
    """The sort key a cursor points after; raises ``InvalidCursorError``."""
    if len(token) > MAX_CURSOR_LENGTH:
        raise InvalidCursorError("The cursor is not one this API issued")
    try:
        padded = token + "=" * (-len(token) % 4)
        document = orjson.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, UnicodeEncodeError, binascii.Error, orjson.JSONDecodeError):
        raise InvalidCursorError("The cursor is not one this API issued") from None
    if not isinstance(document, dict) or document.get("v") != CURSOR_VERSION:
        raise InvalidCursorError("The cursor is not one this API issued")
    if document.get("s") != sort.value:
        raise InvalidCursorError(
            "The cursor belongs to another sort order; start again without a cursor"
        )
    if document.get("f") != filters:
        raise InvalidCursorError(
            "The cursor belongs to other filters; start again without a cursor"
        )
    shape = KEY_SHAPES[sort]
    raw_key = document.get("k")
    if not isinstance(raw_key, list) or len(raw_key) != len(shape):
        raise InvalidCursorError("The cursor is not one this API issued")
    try:
        return tuple(_decode_value(kind, raw) for kind, raw in zip(shape, raw_key, strict=True))
    except (ValueError, TypeError, OverflowError):
        raise InvalidCursorError("The cursor is not one this API issued") from None
