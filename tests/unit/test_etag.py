"""Parsing If-Match / If-None-Match into task versions."""

from __future__ import annotations

import pytest

from service.tasks.etag import etag_for, parse_etag_condition


def test_etag_is_a_strong_quoted_version() -> None:
    assert etag_for(3) == '"3"'


def test_absent_header_is_no_condition() -> None:
    assert parse_etag_condition(None) is None


@pytest.mark.parametrize("header", ["*", " * "])
def test_star_matches_any_version(header: str) -> None:
    condition = parse_etag_condition(header)
    assert condition is not None
    assert condition.matches(1)
    assert condition.matches(99)


@pytest.mark.parametrize(
    ("header", "versions"),
    [
        ('"3"', {3}),
        ('W/"3"', {3}),  # weakened by a compressing proxy
        ('"1", "2",W/"5"', {1, 2, 5}),
        ('"01"', set()),  # not a tag we issued
        ('"0"', set()),
        ('"-1"', set()),
        ('"2147483647"', {2147483647}),
        ('"2147483648"', set()),  # beyond int4: can never be ours
        ('"99999999999999999999"', set()),
        ("3", set()),  # unquoted
        ('""', set()),
        ('"abc"', set()),
        ('"\u0663"', set()),  # a non-ASCII digit
        ("", set()),
        ('"3', set()),
    ],
)
def test_tags(header: str, versions: set[int]) -> None:
    condition = parse_etag_condition(header)
    assert condition is not None
    assert not condition.any
    assert condition.versions == versions
    for version in (1, 2, 3, 5, 2147483647):
        assert condition.matches(version) == (version in versions)
