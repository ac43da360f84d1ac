"""Keyset cursors: round trips for every sort, and refusal of anything else."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from service.tasks.cursor import (
    InvalidCursorError,
    decode_cursor,
    encode_cursor,
    filters_fingerprint,
)
from service.tasks.sorting import TaskSort

WHEN = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
ID = uuid.UUID("0b6f8a4e-8f0e-4a4e-9c55-7b8f7c7f0c11")
FILTERS = filters_fingerprint({"status": "todo"})


@pytest.mark.parametrize(
    ("sort", "key"),
    [
        (TaskSort.CREATED_AT, (WHEN, ID)),
        (TaskSort.CREATED_AT_DESC, (WHEN, ID)),
        (TaskSort.DUE_AT, (WHEN, ID)),
        (TaskSort.DUE_AT, (None, ID)),
        (TaskSort.DUE_AT_DESC, (None, ID)),
        (TaskSort.PRIORITY, (3, WHEN, ID)),
        (TaskSort.PRIORITY, (0, WHEN, ID)),
    ],
)
def test_round_trip(sort: TaskSort, key: tuple) -> None:
    token = encode_cursor(sort, FILTERS, key)
    assert not set(token) & set("=+/")  # URL-safe as is
    assert decode_cursor(token, sort, FILTERS) == key


def test_microseconds_and_offsets_survive() -> None:
    other_zone = WHEN.astimezone(timezone(timedelta(hours=5, minutes=30)))
    token = encode_cursor(TaskSort.CREATED_AT, FILTERS, (other_zone, ID))
    decoded = decode_cursor(token, TaskSort.CREATED_AT, FILTERS)
    assert decoded[0] == WHEN
    assert isinstance(decoded[0], datetime)
    assert decoded[0].tzinfo == UTC


def test_filters_fingerprint_is_order_independent() -> None:
    assert filters_fingerprint({"a": 1, "b": None}) == filters_fingerprint({"b": None, "a": 1})
    assert filters_fingerprint({"a": 1}) != filters_fingerprint({"a": 2})


def _token(document: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(document)).decode().rstrip("=")


GOOD = {"v": 1, "s": "created_at", "f": FILTERS, "k": [WHEN.isoformat(), str(ID)]}


@pytest.mark.parametrize(
    "token",
    [
        "",
        "!!!!",
        "a",  # not a whole base64 quantum
        base64.urlsafe_b64encode(b"\x80\x81").decode(),  # not UTF-8 / JSON
        _token([]),
        _token(None),
        _token({**GOOD, "v": 2}),
        _token({k: v for k, v in GOOD.items() if k != "v"}),
        _token({**GOOD, "s": "-created_at"}),
        _token({**GOOD, "f": "0000"}),
        _token({**GOOD, "k": "not a list"}),
        _token({**GOOD, "k": [WHEN.isoformat()]}),
        _token({**GOOD, "k": [WHEN.isoformat(), str(ID), 1]}),
        _token({**GOOD, "k": [None, str(ID)]}),
        _token({**GOOD, "k": ["2030-01-01T00:00:00", str(ID)]}),
        _token({**GOOD, "k": ["2030-13-01T00:00:00Z", str(ID)]}),
        _token({**GOOD, "k": [WHEN.isoformat(), "xyz"]}),
        _token({**GOOD, "k": [WHEN.isoformat(), 42]}),
        _token({**GOOD, "k": [1700000000, str(ID)]}),
        _token({**GOOD, "k": ["0001-01-01T00:00:00+05:00", str(ID)]}),  # overflows in UTC
        "e" * 600,
        "\u00e9",
    ],
)
def test_rejects(token: str) -> None:
    with pytest.raises(InvalidCursorError) as info:
        decode_cursor(token, TaskSort.CREATED_AT, FILTERS)
    assert info.value.status == 400
    assert info.value.slug == "invalid-cursor"


@pytest.mark.parametrize("rank", [-1, 4, "2", 2.0, True, None])
def test_rejects_impossible_priority_ranks(rank: object) -> None:
    token = _token({"v": 1, "s": "priority", "f": FILTERS, "k": [rank, WHEN.isoformat(), str(ID)]})
    with pytest.raises(InvalidCursorError):
        decode_cursor(token, TaskSort.PRIORITY, FILTERS)


def test_padding_is_optional() -> None:
    token = encode_cursor(TaskSort.CREATED_AT, FILTERS, (WHEN, ID))
    padded = token + "=" * (-len(token) % 4)
    assert decode_cursor(padded, TaskSort.CREATED_AT, FILTERS) == (WHEN, ID)
