"""The limiter's own logic on in-memory storage (no I/O): limits, headers, multiple windows."""

from __future__ import annotations

import pytest
from limits.aio.storage import MemoryStorage
from structlog.testing import capture_logs

from service.security.rate_limit import (
    RateLimiter,
    build_rate_limiter,
    parse_limits,
    storage_uri,
)
from service.settings import load_settings


def test_redis_urls_become_limits_storage_uris() -> None:
    assert storage_uri("redis://h:6379/0") == "async+redis://h:6379/0"
    assert storage_uri("rediss://:pw@h") == "async+rediss://:pw@h"
    assert storage_uri("async+redis://h") == "async+redis://h"


async def test_every_configured_window_applies() -> None:
    limiter = RateLimiter(
        MemoryStorage(),
        per_ip=parse_limits("2/second;3/minute"),
        per_principal=parse_limits("100/minute"),
    )
    results = [await limiter.check("ip", "198.51.100.1") for _ in range(3)]
    assert results[:2] == [None, None]
    exceeded = results[2]
    assert exceeded is not None
    assert exceeded.limit == 2  # the per-second window refused first
    assert exceeded.headers()["Retry-After"] == "1"
    # Scopes do not share counters even for the same identity string.
    assert await limiter.check("principal", "198.51.100.1") is None
    await limiter.aclose()


async def test_default_hooks_are_harmless() -> None:
    limiter = RateLimiter(MemoryStorage(), per_ip=parse_limits("1/minute"), per_principal=[])
    assert await limiter.check("ip", "a") is None
    assert await limiter.check("ip", "a") is not None  # on_exceeded default: no-op
    limiter._on_failure(RuntimeError())  # on_backend_error default: no-op
    assert not limiter.backend_available


@pytest.mark.parametrize("environment", ["staging", "production"])
def test_in_memory_storage_in_production_like_environments_is_a_warning(environment: str) -> None:
    extra = (
        {"database_url": "postgresql://u:p@127.0.0.1/db", "gateway_required": False}
        if environment == "production"
        else {}
    )
    with capture_logs() as logs:
        limiter = build_rate_limiter(load_settings(environment=environment, **extra))
    assert limiter is not None
    assert isinstance(limiter.storage, MemoryStorage)
    assert any(entry["event"] == "rate_limit_in_memory" for entry in logs)


def test_disabled_means_no_limiter() -> None:
    assert build_rate_limiter(load_settings(rate_limit_enabled=False)) is None
