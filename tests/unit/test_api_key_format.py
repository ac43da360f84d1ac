"""API key format, hashing and scope parsing (no I/O)."""

from __future__ import annotations

import hashlib
import re
import uuid

import pytest

from service.errors import ForbiddenError
from service.security.api_keys import (
    PREFIX_LENGTH,
    hash_key,
    looks_like_api_key,
    mint_key,
    parse_scopes,
    require,
    split_key,
)
from service.security.principal import Principal, owner_id_from

KEY_SHAPE = re.compile(r"^fa_[a-z0-9]{12}_[A-Za-z0-9_-]{43}$")


def test_minted_keys_have_the_documented_shape_and_are_unique() -> None:
    minted = [mint_key() for _ in range(500)]
    for prefix, plaintext in minted:
        assert KEY_SHAPE.match(plaintext), plaintext
        assert plaintext.startswith(f"fa_{prefix}_")
        assert split_key(plaintext) == (prefix, plaintext[len(prefix) + 4 :])
        assert looks_like_api_key(plaintext)
    assert len({plaintext for _, plaintext in minted}) == 500
    assert len({prefix for prefix, _ in minted}) == 500


def test_secret_with_underscores_still_splits_at_the_prefix() -> None:
    plaintext = "fa_abcdefghijkl_" + "_a-b" * 11
    assert split_key(plaintext) == ("abcdefghijkl", "_a-b" * 11)


@pytest.mark.parametrize(
    "malformed",
    [
        "",
        "fa_",
        "fa_short_" + "x" * 43,  # prefix too short
        "xx_abcdefghijkl_" + "x" * 43,  # wrong marker
        "fa_abcdefghijkl_" + "x" * 31,  # secret too short
        "fa_abcdefghijklm_" + "x" * 43,  # prefix too long
    ],
)
def test_malformed_keys_do_not_split(malformed: str) -> None:
    assert split_key(malformed) is None


def test_jwts_are_not_mistaken_for_api_keys() -> None:
    assert not looks_like_api_key("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln")
    assert not looks_like_api_key("fa-not-a-key")


def test_only_a_sha256_of_the_whole_key_is_stored() -> None:
    _, plaintext = mint_key()
    assert hash_key(plaintext) == hashlib.sha256(plaintext.encode()).hexdigest()
    assert len(hash_key(plaintext)) == 64
    assert PREFIX_LENGTH == 12


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("tasks:read", ["tasks:read"]),
        (" tasks:write , tasks:read,tasks:read ", ["tasks:read", "tasks:write"]),
        ("admin", ["admin"]),
    ],
)
def test_scopes_are_parsed_sorted_and_deduplicated(raw: str, expected: list[str]) -> None:
    assert parse_scopes(raw) == expected


@pytest.mark.parametrize("raw", ["", ",", "tasks:delete", "tasks:read,root", "TASKS:READ"])
def test_unknown_or_empty_scopes_are_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="tasks:read"):
        parse_scopes(raw)


def test_missing_scope_is_forbidden_with_insufficient_scope_challenge() -> None:
    reader = Principal(uuid.uuid4(), frozenset({"tasks:read"}), "api_key", "abc")
    assert require(reader, "tasks:read") is reader
    with pytest.raises(ForbiddenError) as error:
        require(reader, "tasks:write")
    assert error.value.status == 403
    assert 'error="insufficient_scope"' in error.value.headers["WWW-Authenticate"]
    assert 'scope="tasks:write"' in error.value.headers["WWW-Authenticate"]


def test_admin_implies_every_scope() -> None:
    admin = Principal(uuid.uuid4(), frozenset({"admin"}), "jwt", "root")
    assert require(admin, "tasks:write") is admin


def test_owner_names_map_to_stable_uuids() -> None:
    given = uuid.uuid4()
    assert owner_id_from(str(given)) == given
    assert owner_id_from("alice") == owner_id_from("alice") != owner_id_from("bob")
