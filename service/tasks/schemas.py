"""The Task's wire format: what a client may send and what it gets back.

Validation happens here, once, so the repository only ever sees clean values: titles trimmed,
timestamps timezone-aware and in UTC, tags unique. Strings that PostgreSQL cannot store (NUL
characters, unpaired surrogates smuggled in through JSON ``\\ud800`` escapes) are rejected with
a 422 instead of failing in the driver.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from service.tasks.models import TaskPriority, TaskStatus

TITLE_MAX = 200
DESCRIPTION_MAX = 10_000
TAG_MAX = 32
TAGS_MAX = 20
# Up to this many unknown fields get an error each (with its pointer); more are refused as one
# error before pydantic would build one per field (90,000 of them fit in a 1 MiB body).
UNKNOWN_FIELDS_LISTED = 20
# The years a date-time may be written with. Python's datetime.min and datetime.max are what
# asyncpg stores as PostgreSQL -infinity and infinity, which come back without a time zone and
# cannot be paged past; 9999 is left out so that no UTC offset can reach (or overflow) the
# largest instant. A range of written years is what an OpenAPI pattern can state exactly.
YEAR_MIN, YEAR_MAX = 1900, 9998
YEAR_PATTERN = r"^(19\d\d|[2-8]\d\d\d|9[0-8]\d\d|99[0-8]\d|999[0-8])-"

# Fields the server owns; naming one in a request body is a 422 like any unknown field.
READ_ONLY_FIELDS = ("id", "created_at", "updated_at", "version")


def storable_text(value: str) -> str:
    """Reject what PostgreSQL text cannot hold, before it reaches the driver as a 500."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no unpaired surrogates)") from None
    return value


_RFC3339_START = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _rfc3339_only(value: Any) -> Any:
    # Pydantic would also take Unix timestamps, as numbers or digit strings, and bare dates;
    # the API promises RFC 3339 date-times.
    if isinstance(value, str) and _RFC3339_START.match(value):
        return value
    if isinstance(value, datetime):
        return value
    raise ValueError("must be an RFC 3339 date-time with a UTC offset, e.g. 2030-01-31T17:00:00Z")


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range") from None


def _few_enough_tags(value: Any) -> Any:
    # Before the items are validated: 300,000 invalid tags would otherwise be 300,000 errors.
    if isinstance(value, list) and len(value) > TAGS_MAX:
        raise PydanticCustomError(
            "too_long",
            "must have at most {max} tags, not {count}",
            {"max": TAGS_MAX, "count": len(value)},
        )
    return value


def _unique_tags(tags: list[str]) -> list[str]:
    if len(set(tags)) != len(tags):
        raise ValueError("tags must be unique")
    return tags


def aware_utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("must include a UTC offset (e.g. 'Z' or '+02:00')")
    if not YEAR_MIN <= value.year <= YEAR_MAX:
        raise ValueError(f"must have a year from {YEAR_MIN} to {YEAR_MAX}")
    return _to_utc(value)


# What counts as whitespace: ECMAScript's \s, spelled out, so that the OpenAPI patterns below
# (ECMA-262 regexes, as clients and fuzzers read them) and the server's checks agree character
# for character. (Python's str.strip() would also strip U+001C-U+001F, Rust's U+0085.)
WHITESPACE = (
    "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)
_WS = r"\t\n\x0b\x0c\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
NO_NUL_PATTERN = r"^[^\x00]*$"
NOT_BLANK_PATTERN = rf"^[^\x00]*[^\x00{_WS}][^\x00]*$"
TRIMMED_PATTERN = rf"^[^\x00{_WS}]([^\x00]*[^\x00{_WS}])?$"


def _trimmed_title(value: str) -> str:
    value = storable_text(value).strip(WHITESPACE)
    if not value:
        raise ValueError("must not be blank")
    return value


def untrimmed_tag(value: str) -> str:
    if storable_text(value).strip(WHITESPACE) != value:
        raise ValueError("must not start or end with whitespace")
    return value


# The length limits apply to the text as sent, so the documented maxLength is exact.
Title = Annotated[
    str,
    StringConstraints(min_length=1, max_length=TITLE_MAX),
    AfterValidator(_trimmed_title),
    Field(
        description="1-200 characters, not blank; surrounding whitespace is trimmed",
        examples=["Ship it"],
        json_schema_extra={"pattern": NOT_BLANK_PATTERN},
    ),
]
Description = Annotated[
    str,
    StringConstraints(max_length=DESCRIPTION_MAX),
    AfterValidator(storable_text),
    Field(
        description="Up to 10,000 characters",
        examples=["Release notes, then tag v1.2"],
        json_schema_extra={"pattern": NO_NUL_PATTERN},
    ),
]
Tag = Annotated[
    str,
    StringConstraints(min_length=1, max_length=TAG_MAX),
    AfterValidator(untrimmed_tag),
    Field(
        description="1-32 characters, no surrounding whitespace",
        json_schema_extra={"pattern": TRIMMED_PATTERN},
    ),
]
Tags = Annotated[
    list[Tag],
    BeforeValidator(_few_enough_tags),
    AfterValidator(_unique_tags),
    Field(
        max_length=TAGS_MAX,
        description="Up to 20 unique tags, each 1-32 characters; duplicates are a 422",
        examples=[["release", "backend"]],
        json_schema_extra={"uniqueItems": True},
    ),
]
RFC3339DateTime = Annotated[
    datetime,
    BeforeValidator(_rfc3339_only),
    AfterValidator(aware_utc),
    Field(json_schema_extra={"pattern": YEAR_PATTERN}),
]
"""A timezone-aware instant given as RFC 3339 text with a year from 1900 to 9998, normalised to
UTC."""

UtcDateTime = Annotated[
    RFC3339DateTime,
    Field(
        description="RFC 3339 date-time with a UTC offset (naive values are rejected) and a "
        "year from 1900 to 9998; returned in UTC",
        examples=["2030-01-31T17:00:00Z"],
    ),
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _few_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) > len(cls.__pydantic_fields__):
            # Counted through the few known names, not the many sent ones: O(1) per body.
            unknown = len(data) - sum(name in data for name in cls.__pydantic_fields__)
            if unknown > UNKNOWN_FIELDS_LISTED:
                raise PydanticCustomError(
                    "extra_forbidden",
                    "{count} fields are not part of the request: only {known} are",
                    {"count": unknown, "known": ", ".join(cls.__pydantic_fields__)},
                )
        return data


class TaskCreate(_Body):
    """A new task. Only ``title`` is required."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "title": "Ship it",
                    "description": "Release notes, then tag v1.2",
                    "priority": "high",
                    "due_at": "2030-01-31T17:00:00Z",
                    "tags": ["release"],
                }
            ]
        }
    )

    title: Title
    description: Description | None = None
    status: TaskStatus = TaskStatus.TODO
    priority: TaskPriority = TaskPriority.NORMAL
    due_at: UtcDateTime | None = None
    tags: Tags = []


NON_NULLABLE_PATCH_FIELDS = ("title", "status", "priority", "tags")


def _patch_json_schema(schema: dict[str, Any]) -> None:
    """Document that only ``description`` and ``due_at`` may be null in a patch."""
    properties = schema.get("properties", {})
    for name in NON_NULLABLE_PATCH_FIELDS:
        prop = properties.get(name, {})
        prop.pop("default", None)  # "absent", not null
        variants = [v for v in prop.pop("anyOf", []) if v.get("type") != "null"]
        if len(variants) == 1:
            prop.update(variants[0])
    schema["examples"] = [{"status": "done", "due_at": None}]


class TaskPatch(_Body):
    """A JSON merge patch (RFC 7396): absent fields stay as they are, ``null`` clears
    ``description`` and ``due_at``; ``null`` for any other field is a 422. ``tags`` replaces the
    whole list."""

    model_config = ConfigDict(json_schema_extra=_patch_json_schema)

    # Optional so that an absent field can default to None; a null that is actually sent for
    # one of the non-nullable fields is refused by _not_null below.
    title: Title | None = None
    description: Description | None = None
    status: TaskStatus | None = None
    priority: TaskPriority | None = None
    due_at: UtcDateTime | None = None
    tags: Tags | None = None

    @field_validator(*NON_NULLABLE_PATCH_FIELDS, mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        # Only runs for fields present in the body, so "absent" and "null" stay distinct.
        if value is None:
            raise ValueError("may not be null")
        return value

    def changes(self) -> dict[str, Any]:
        """The fields the client sent, with their (possibly null) new values."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class TaskOut(BaseModel):
    """A task as the API returns it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "0b6f8a4e-8f0e-4a4e-9c55-7b8f7c7f0c11",
                    "title": "Ship it",
                    "description": None,
                    "status": "todo",
                    "priority": "high",
                    "due_at": "2030-01-31T17:00:00Z",
                    "tags": ["release"],
                    "created_at": "2030-01-02T09:30:00.123456Z",
                    "updated_at": "2030-01-02T09:30:00.123456Z",
                    "version": 1,
                }
            ]
        }
    )

    id: uuid.UUID
    title: str
    description: str | None
    status: TaskStatus
    priority: TaskPriority
    due_at: datetime | None
    tags: list[str]
    created_at: datetime
    updated_at: datetime
    version: int = Field(description="Incremented by every change; the ETag is derived from it")


TASK_FIELDS: tuple[str, ...] = tuple(TaskOut.model_fields)


class TaskPage(BaseModel):
    """One page of tasks; pass ``next_cursor`` back as ``cursor`` for the next one."""

    items: list[TaskOut]
    next_cursor: str | None = Field(
        description="Opaque; null on the last page", examples=["eyJzIjoiLWNyZWF0ZWRfYXQiLi4ufQ"]
    )
