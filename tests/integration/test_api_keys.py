"""API keys end to end: lifecycle, cache (no query per request once warm), revocation bound, CLI."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from securitykit import PROBE, poll_until, security_app
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import Database
from service.entrypoints.cli import main
from service.security.api_keys import ApiKeyAuthenticator, ApiKeyRepository
from service.security.models import ApiKey
from service.security.principal import owner_id_from
from service.settings import Settings
from testkit import service_cli

MakeCredential = Callable[..., Awaitable[Any]]


@contextmanager
def count_statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """Every SQL statement the engine sends while the block runs."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


async def last_used(database: Database, prefix: str) -> datetime | None:
    async for session in database.session():
        row = (await session.execute(select(ApiKey).where(ApiKey.prefix == prefix))).scalar_one()
    return row.last_used_at


async def test_warm_key_costs_no_query_and_refresh_costs_one(
    make_settings: Callable[..., Settings], make_credential: MakeCredential, database: Database
) -> None:
    credential = await make_credential(scopes=("tasks:read",))
    async with security_app(make_settings(api_key_cache_ttl_seconds=60)) as running:
        engine = running.state.database.engine
        with count_statements(engine) as cold:
            first = await running.client.get(f"{PROBE}/read", headers=credential.headers)
        assert first.status_code == 200, first.text
        assert len(cold) == 1, cold  # one UPDATE ... RETURNING: fetch and stamp last_used_at
        stamped = await last_used(database, credential.prefix)
        assert stamped is not None

        with count_statements(engine) as warm:
            for _ in range(25):
                response = await running.client.get(f"{PROBE}/read", headers=credential.headers)
                assert response.status_code == 200
        assert warm == []
        assert await last_used(database, credential.prefix) == stamped


async def test_cold_cache_under_concurrency_is_one_query(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    async with security_app(make_settings()) as running:
        with count_statements(running.state.database.engine) as seen:
            responses = await asyncio.gather(
                *(
                    running.client.get(f"{PROBE}/read", headers=credential.headers)
                    for _ in range(20)
                )
            )
        assert [r.status_code for r in responses] == [200] * 20
        assert len(seen) == 1, seen


async def test_unknown_prefix_is_cached_too(make_settings: Callable[..., Settings]) -> None:
    # Repeating a bad key must not cost a query per attempt either.
    bogus = "fa_zzzzzzzzzzzz_" + "x" * 43
    async with security_app(make_settings()) as running:
        with count_statements(running.state.database.engine) as seen:
            for _ in range(5):
                response = await running.client.get(f"{PROBE}/read", headers={"X-API-Key": bogus})
                assert response.status_code == 401
        assert len(seen) == 1


async def test_wrong_secret_for_a_real_prefix_is_401(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    forged = f"fa_{credential.prefix}_{'A' * 43}"
    async with security_app(make_settings()) as running:
        # Warm the cache with the real key first: the forged one must fail against the cache too.
        assert (
            await running.client.get(f"{PROBE}/read", headers=credential.headers)
        ).status_code == 200
        response = await running.client.get(f"{PROBE}/read", headers={"X-API-Key": forged})
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert "WWW-Authenticate" in response.headers


async def test_expired_key_is_401(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential(expires_at=datetime.now(UTC) - timedelta(minutes=1))
    async with security_app(make_settings()) as running:
        response = await running.client.get(f"{PROBE}/read", headers=credential.headers)
    assert response.status_code == 401
    assert response.json()["detail"] == "API key expired"
    assert "WWW-Authenticate" in response.headers


async def test_expiry_is_exact_even_while_cached(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    expires_at = datetime.now(UTC) + timedelta(seconds=1.5)
    credential = await make_credential(expires_at=expires_at)
    async with security_app(make_settings(api_key_cache_ttl_seconds=300)) as running:
        assert (
            await running.client.get(f"{PROBE}/read", headers=credential.headers)
        ).status_code == 200

        async def rejected() -> bool:
            response = await running.client.get(f"{PROBE}/read", headers=credential.headers)
            return response.status_code == 401

        await poll_until(rejected, timeout=5)
    # Not before its time: the key worked until expires_at, despite a 300 s cache.
    assert datetime.now(UTC) >= expires_at


async def test_revoked_key_is_401(
    make_settings: Callable[..., Settings], make_credential: MakeCredential, database: Database
) -> None:
    credential = await make_credential()
    async for session in database.session():
        assert await ApiKeyRepository(session).revoke(credential.prefix)
    async for session in database.session():
        # Revoking twice changes nothing and says so (the CLI then exits 1).
        assert not await ApiKeyRepository(session).revoke(credential.prefix)
    async with security_app(make_settings()) as running:
        response = await running.client.get(f"{PROBE}/read", headers=credential.headers)
    assert response.status_code == 401
    assert response.json()["detail"] == "API key revoked"
    assert "WWW-Authenticate" in response.headers


async def test_revocation_takes_effect_within_the_cache_ttl(
    make_settings: Callable[..., Settings], make_credential: MakeCredential, database_url: str
) -> None:
    ttl = 1.0
    credential = await make_credential()
    async with security_app(make_settings(api_key_cache_ttl_seconds=ttl)) as running:
        get = running.client.get
        assert (await get(f"{PROBE}/read", headers=credential.headers)).status_code == 200

        result = await asyncio.to_thread(
            service_cli,
            database_url,
            "revoke-api-key",
            credential.prefix,
            API_KEY_CACHE_TTL_SECONDS=str(ttl),
        )
        assert result.returncode == 0, result.stderr
        assert f"within {ttl:g} s" in result.stdout

        async def rejected() -> bool:
            response = await get(f"{PROBE}/read", headers=credential.headers)
            return response.status_code == 401

        # Bound: the TTL after the revoke committed (plus polling slack).
        took = await poll_until(rejected, timeout=ttl + 2)
        assert took <= ttl + 1


async def test_cli_create_prints_the_key_alone_on_the_last_line(
    make_settings: Callable[..., Settings], database_url: str
) -> None:
    owner = f"team-{uuid.uuid4().hex[:8]}"
    result = await asyncio.to_thread(
        service_cli, database_url, "create-api-key", "--owner", owner, "--scopes", "tasks:read"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    key = lines[-1]
    assert key.startswith("fa_")
    assert " " not in key
    # Shown once: nowhere else in the output, nothing on stderr.
    assert result.stdout.count(key) == 1
    assert key not in result.stderr

    async with security_app(make_settings()) as running:
        read = await running.client.get(f"{PROBE}/read", headers={"X-API-Key": key})
        write = await running.client.post(f"{PROBE}/write", headers={"X-API-Key": key})
    assert read.status_code == 200, read.text
    assert read.json()["owner_id"] == str(owner_id_from(owner))
    assert read.json()["scopes"] == ["tasks:read"]
    assert write.status_code == 403


def run_cli_in_process(monkeypatch: pytest.MonkeyPatch, database_url: str, *args: str) -> int:
    """``python -m service ...`` without a new interpreter (for the cheap error paths)."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("ENVIRONMENT", "test")
    return main(list(args))


async def test_cli_refuses_unknown_scopes(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every malformed variant is covered by tests/unit/test_api_key_format.py; this checks the
    # exit status and message an operator sees.
    code = await asyncio.to_thread(
        run_cli_in_process,
        monkeypatch,
        database_url,
        "create-api-key",
        "--owner",
        "alice",
        "--scopes",
        "tasks:read,delete",
    )
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("error: --scopes:")
    assert "tasks:read" in err  # says what is allowed
    assert "fa_" not in out


async def test_cli_revoke_of_unknown_prefix_fails(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await asyncio.to_thread(
        run_cli_in_process, monkeypatch, database_url, "revoke-api-key", "nosuchprefix"
    )
    assert code == 1
    assert "no active key with prefix nosuchprefix" in capsys.readouterr().err


async def test_zero_ttl_disables_the_cache(
    make_settings: Callable[..., Settings], make_credential: MakeCredential, database: Database
) -> None:
    credential = await make_credential()
    async with security_app(make_settings(api_key_cache_ttl_seconds=0)) as running:
        with count_statements(running.state.database.engine) as seen:
            for _ in range(3):
                response = await running.client.get(f"{PROBE}/read", headers=credential.headers)
                assert response.status_code == 200
        assert len(seen) == 3
        # With no cache, revocation is immediate.
        async for session in database.session():
            assert await ApiKeyRepository(session).revoke(credential.prefix)
        response = await running.client.get(f"{PROBE}/read", headers=credential.headers)
        assert response.status_code == 401


async def test_cache_is_bounded_least_recently_used_first(
    make_credential: MakeCredential, database: Database
) -> None:
    first, second, third = [await make_credential() for _ in range(3)]
    authenticator = ApiKeyAuthenticator(database.sessionmaker, ttl_seconds=60, max_entries=2)
    with count_statements(database.engine) as seen:
        for credential in (first, second, first, third):  # third evicts second, not first
            await authenticator.authenticate(credential.key)
        assert len(seen) == 3
        await authenticator.authenticate(first.key)
        assert len(seen) == 3
        await authenticator.authenticate(second.key)
        assert len(seen) == 4
