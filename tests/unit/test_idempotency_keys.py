"""Idempotency-Key parsing, request fingerprints and advisory lock ids."""

from __future__ import annotations

import uuid

import pytest

from service.idempotency.store import (
    advisory_lock_id,
    parse_idempotency_key,
    request_fingerprint,
)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("abc", "abc"),
        ('"abc"', "abc"),  # Structured Field string
        ("  abc  ", "abc"),
        ("a b", "a b"),
        ("k" * 255, "k" * 255),
        ('"' + "k" * 255 + '"', "k" * 255),
        ('"', '"'),
    ],
)
def test_valid_keys(raw: str, key: str) -> None:
    assert parse_idempotency_key(raw) == key


@pytest.mark.parametrize("raw", ["", "   ", '""', "k" * 256, "caf\u00e9", "a\tb", "a\x00b", "\x7f"])
def test_invalid_keys(raw: str) -> None:
    assert parse_idempotency_key(raw) is None


def test_fingerprint_depends_on_method_path_and_body_but_not_key_order() -> None:
    base = request_fingerprint("POST", "/v1/tasks", {"title": "x", "tags": []})
    assert base == request_fingerprint("post", "/v1/tasks", {"tags": [], "title": "x"})
    assert len(base) == 64
    assert base != request_fingerprint("PUT", "/v1/tasks", {"title": "x", "tags": []})
    assert base != request_fingerprint("POST", "/v1/other", {"title": "x", "tags": []})
    assert base != request_fingerprint("POST", "/v1/tasks", {"title": "y", "tags": []})


def test_lock_ids_are_signed_64_bit_and_scoped_by_owner() -> None:
    owner_a, owner_b = uuid.uuid4(), uuid.uuid4()
    lock = advisory_lock_id(owner_a, "k")
    assert -(2**63) <= lock < 2**63
    assert lock == advisory_lock_id(owner_a, "k")
    assert lock != advisory_lock_id(owner_b, "k")
    assert lock != advisory_lock_id(owner_a, "k2")
