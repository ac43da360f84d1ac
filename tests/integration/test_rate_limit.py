"""Rate limits in one process (in-memory storage), and failing open when Redis is unreachable.

The shared-budget and Redis outage tests with a real redis-server are in
tests/stack/test_rate_limit_redis.py.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from securitykit import PROBE, security_app

from service.settings import Settings
from testkit import free_port

MakeCredential = Callable[..., Awaitable[Any]]


def limited(make_settings: Callable[..., Settings], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "rate_limit_enabled": True,
        "rate_limit_per_ip": "1000/minute",
        "rate_limit_default": "1000/minute",
    }
    values.update(overrides)
    return make_settings(**values)


def assert_429(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/rate-limited")
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert response.headers["RateLimit-Limit"] == str(limit)
    assert response.headers["RateLimit-Remaining"] == "0"
    assert 1 <= int(response.headers["RateLimit-Reset"]) <= 60


async def test_fourth_request_from_one_ip_is_429_and_probes_are_never_limited(
    make_settings: Callable[..., Settings],
) -> None:
    exceeded: Counter[str] = Counter()
    async with security_app(limited(make_settings, rate_limit_per_ip="3/minute")) as running:
        limiter = running.state.rate_limiter
        assert limiter is not None
        limiter.on_exceeded = lambda scope: exceeded.update([scope])
        statuses = [(await running.client.get(f"{PROBE}/read")).status_code for _ in range(3)]
        # Unauthenticated requests count against the IP: that is what slows a key-guessing bot.
        assert statuses == [401, 401, 401]
        assert_429(await running.client.get(f"{PROBE}/read"), limit=3)
        assert_429(await running.client.get("/openapi.json"), limit=3)
        for path in ("/health/live", "/health/ready", "/health") * 5:
            assert (await running.client.get(path)).status_code == 200, path

        # Another client address has its own budget.
        async with running.client_from("203.0.113.7") as other:
            assert (await other.get(f"{PROBE}/read")).status_code == 401
    assert exceeded == {"ip": 2}


async def test_per_principal_budgets_are_separate_and_shared_by_one_owners_keys(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    alice_1 = await make_credential()
    alice_2 = await make_credential(owner_id=alice_1.owner_id)
    bob = await make_credential()
    exceeded: Counter[str] = Counter()
    async with security_app(limited(make_settings, rate_limit_default="3/minute")) as running:
        limiter = running.state.rate_limiter
        assert limiter is not None
        limiter.on_exceeded = lambda scope: exceeded.update([scope])
        get = running.client.get
        for credential in (alice_1, alice_2, alice_1):
            assert (await get(f"{PROBE}/read", headers=credential.headers)).status_code == 200
        refused = await get(f"{PROBE}/read", headers=alice_2.headers)
        assert_429(refused, limit=3)
        assert "owner" in refused.json()["detail"]
        # The access log can still say who was limited.
        assert running.last_scope_state["principal"].credential_id == alice_2.prefix

        for _ in range(3):
            assert (await get(f"{PROBE}/read", headers=bob.headers)).status_code == 200
    assert exceeded == {"principal": 1}


async def test_rate_limiting_off_means_no_limiter(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    async with security_app(
        make_settings(rate_limit_enabled=False, rate_limit_per_ip="1/minute")
    ) as running:
        assert running.state.rate_limiter is None
        for _ in range(5):
            response = await running.client.get(f"{PROBE}/read", headers=credential.headers)
            assert response.status_code == 200


async def test_unreachable_redis_fails_open_quickly_and_is_counted_once_per_window(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    settings = limited(
        make_settings,
        rate_limit_per_ip="1/minute",
        rate_limit_default="1/minute",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
    )
    errors = 0

    def on_backend_error() -> None:
        nonlocal errors
        errors += 1

    async with security_app(settings) as running:
        limiter = running.state.rate_limiter
        assert limiter is not None
        limiter.on_backend_error = on_backend_error
        started = time.monotonic()
        for _ in range(10):
            response = await running.client.get(f"{PROBE}/read", headers=credential.headers)
            assert response.status_code == 200, response.text  # fail open: far over 1/minute
        assert time.monotonic() - started < 5
        # The first failure opens the circuit: later requests skip Redis instead of each
        # paying a connection attempt.
        assert errors == 1
        assert not limiter.backend_available
