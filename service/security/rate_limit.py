"""Rate limits per client IP and per principal, shared by all replicas through Redis.

Built on the ``limits`` library's async API with the sliding-window-counter strategy: two
counters per key in Redis (constant memory per client, unlike a moving window's one entry per
request) and no burst of twice the limit at a window boundary (unlike a fixed window).

Availability beats precision here: when the storage fails the limiter **fails open**. Each
failure opens a circuit for ``breaker_seconds`` during which requests skip the storage
entirely, so a dead or hung Redis costs at most one short timeout per process per few seconds,
never seconds per request. Failures are reported through ``on_backend_error`` (wired to
``rate_limit_backend_errors_total``) and logged once per outage, not once per request.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog
from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from service.errors import DomainError
from service.settings import Settings

log = structlog.get_logger("service.security.rate_limit")

LimitScope = Literal["ip", "principal"]

# A healthy Redis on the same network answers in well under a millisecond; anything slower than
# this is treated as down rather than allowed to add latency to every request.
BACKEND_TIMEOUT_SECONDS = 0.25
BREAKER_SECONDS = 5.0
KEY_PREFIX = "fastapi-app:ratelimit"


def _noop_exceeded(scope: str) -> None:
    return None


def _noop_backend_error() -> None:
    return None


def storage_uri(redis_url: str) -> str:
    """The ``limits`` storage URI for a Redis URL: ``redis://h:6379/0`` -> ``async+redis://...``."""
    return redis_url if redis_url.startswith("async+") else f"async+{redis_url}"


@dataclass(frozen=True, slots=True)
class LimitExceeded:
    """A refused request: what the 429 tells the client (IETF RateLimit header fields draft)."""

    scope: LimitScope
    limit: int
    retry_after: int

    def headers(self) -> dict[str, str]:
        return {
            "Retry-After": str(self.retry_after),
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": "0",
            "RateLimit-Reset": str(self.retry_after),
        }


class RateLimitedError(DomainError):
    status, slug, title = 429, "rate-limited", "Too Many Requests"

    def __init__(self, exceeded: LimitExceeded) -> None:
        super().__init__(_detail(exceeded), headers=exceeded.headers())


def _detail(exceeded: LimitExceeded) -> str:
    who = "this client address" if exceeded.scope == "ip" else "this credential's owner"
    return f"Rate limit for {who} exceeded; retry in {exceeded.retry_after} s"


class RateLimiter:
    """Counts hits per (scope, identity) and says when one is over its limit."""

    def __init__(
        self,
        storage: Storage,
        *,
        per_ip: list[RateLimitItem],
        per_principal: list[RateLimitItem],
        on_exceeded: Callable[[str], None] = _noop_exceeded,
        on_backend_error: Callable[[], None] = _noop_backend_error,
        backend_timeout: float = BACKEND_TIMEOUT_SECONDS,
        breaker_seconds: float = BREAKER_SECONDS,
    ) -> None:
        self.storage = storage
        self._strategy = SlidingWindowCounterRateLimiter(storage)
        self._limits: dict[LimitScope, list[RateLimitItem]] = {
            "ip": per_ip,
            "principal": per_principal,
        }
        # Public and assignable: app wiring (metrics) and tests connect their own counters.
        self.on_exceeded = on_exceeded
        self.on_backend_error = on_backend_error
        # Bounds the whole check (connection retries, pool waits included), not just one socket
        # operation: the client's own timeouts apply per attempt.
        self._deadline = backend_timeout
        # How long requests skip the storage after a failure (public for tuning and tests).
        self.breaker_seconds = breaker_seconds
        self._skip_until = 0.0
        self._failing = False

    @property
    def backend_available(self) -> bool:
        """False while the circuit is open (requests pass unlimited)."""
        return time.monotonic() >= self._skip_until

    async def check(self, scope: LimitScope, identity: str) -> LimitExceeded | None:
        """Count one hit; return what was exceeded, or None to let the request through."""
        if time.monotonic() < self._skip_until:
            return None
        try:
            async with asyncio.timeout(self._deadline):
                exceeded = await self._hit(scope, identity)
        except Exception as exc:
            # Deliberately broad: whatever the storage raises (refused, timeout, protocol,
            # auth), the API must stay up. The type is logged, never the message (it may hold
            # the Redis URL with its password).
            self._on_failure(exc)
            return None
        if self._failing:
            self._failing = False
            log.info("rate_limit_backend_recovered")
        if exceeded is not None:
            self.on_exceeded(scope)
        return exceeded

    async def _hit(self, scope: LimitScope, identity: str) -> LimitExceeded | None:
        for item in self._limits[scope]:
            if await self._strategy.hit(item, scope, identity):
                continue
            stats = await self._strategy.get_window_stats(item, scope, identity)
            retry_after = max(1, math.ceil(stats.reset_time - time.time()))
            return LimitExceeded(scope=scope, limit=item.amount, retry_after=retry_after)
        return None

    def _on_failure(self, exc: BaseException) -> None:
        self._skip_until = time.monotonic() + self.breaker_seconds
        self.on_backend_error()
        if not self._failing:
            self._failing = True
            log.warning(
                "rate_limit_backend_unavailable",
                error_type=type(exc).__name__,
                fail_open_seconds=self.breaker_seconds,
            )

    async def aclose(self) -> None:
        # ``limits`` storages have no close(); release what they hold, best effort: the memory
        # storage's expiry task, the Redis client's pooled connections.
        timer = getattr(self.storage, "timer", None)
        if isinstance(timer, asyncio.Task):
            timer.cancel()
        client = getattr(getattr(self.storage, "bridge", None), "storage", None)
        disconnect = getattr(getattr(client, "connection_pool", None), "disconnect", None)
        if callable(disconnect):
            disconnect()


def parse_limits(value: str) -> list[RateLimitItem]:
    """``"100/minute"`` or ``"10/second;300/minute"`` -> limit items (ValueError if malformed)."""
    return list(parse_many(value))


def build_rate_limiter(
    settings: Settings,
    *,
    on_exceeded: Callable[[str], None] = _noop_exceeded,
    on_backend_error: Callable[[], None] = _noop_backend_error,
) -> RateLimiter | None:
    """The limiter for these settings, or None when rate limiting is off."""
    if not settings.rate_limit_enabled:
        return None
    storage: Storage
    if settings.redis_url is not None:
        built = storage_from_string(
            storage_uri(settings.redis_url.get_secret_value()),
            key_prefix=KEY_PREFIX,
            wrap_exceptions=True,
            connect_timeout=BACKEND_TIMEOUT_SECONDS,
            stream_timeout=BACKEND_TIMEOUT_SECONDS,
        )
        assert isinstance(built, Storage)
        storage = built
    else:
        if settings.is_production_like:
            log.warning(
                "rate_limit_in_memory",
                reason="REDIS_URL is not set: each process counts on its own, so the effective "
                "limit is multiplied by workers x replicas",
            )
        storage = MemoryStorage()
    return RateLimiter(
        storage,
        per_ip=parse_limits(settings.rate_limit_per_ip),
        per_principal=parse_limits(settings.rate_limit_default),
        on_exceeded=on_exceeded,
        on_backend_error=on_backend_error,
    )
