"""Rate limits on a real redis-server: one budget across app instances, fail open when it is gone.

Each app instance below is a full app (own lifespan, own limiter, own Redis connection pool), as
two replicas would be; they share nothing but the Redis server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from securitykit import PROBE, RunningApp, poll_until, security_app

from service.settings import Settings
from testkit import free_port, port_open, require_binary, wait_until

pytestmark = pytest.mark.stack
MakeCredential = Callable[..., Awaitable[Any]]


@dataclass
class RedisServer:
    binary: str
    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [self.binary, "--save", "", "--appendonly", "no", "--port", str(self.port)]
        command += ["--bind", "127.0.0.1", "--dir", str(self.workdir)]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(lambda: port_open(self.port), timeout=10, what="redis-server to listen")

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGCONT)  # in case a test left it paused
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        wait_until(lambda: not port_open(self.port), timeout=10, what="redis port to close")

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(require_binary("redis-server"), free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def shared(
    make_settings: Callable[..., Settings], redis: RedisServer, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "rate_limit_enabled": True,
        "rate_limit_per_ip": "1000/minute",
        "rate_limit_default": "1000/minute",
        "redis_url": redis.url,
    }
    values.update(overrides)
    return make_settings(**values)


async def two_replicas(stack: AsyncExitStack, settings: Settings) -> list[RunningApp]:
    return [await stack.enter_async_context(security_app(settings)) for _ in range(2)]


async def test_two_instances_share_one_budget(
    make_settings: Callable[..., Settings],
    make_credential: MakeCredential,
    redis_server: RedisServer,
) -> None:
    credential = await make_credential()
    settings = shared(
        make_settings, redis_server, rate_limit_per_ip="6/minute", rate_limit_default="4/minute"
    )
    async with AsyncExitStack() as stack:
        a, b = await two_replicas(stack, settings)
        # Per principal: 4 across both instances, alternating, then both refuse.
        statuses = [
            (await app.client.get(f"{PROBE}/read", headers=credential.headers)).status_code
            for app in (a, b, a, b, a, b)
        ]
        assert statuses == [200, 200, 200, 200, 429, 429]
        # Per IP (6 hits counted so far from 127.0.0.1, on both instances): the next is refused,
        # even unauthenticated and on the instance that saw only half of them.
        refused = await a.client.get(f"{PROBE}/read")
        assert refused.status_code == 429
        assert refused.headers["RateLimit-Limit"] == "6"
        assert (await b.client.get("/health/live")).status_code == 200


async def test_redis_down_fails_open_fast_and_limiting_resumes_when_it_returns(
    make_settings: Callable[..., Settings],
    make_credential: MakeCredential,
    redis_server: RedisServer,
) -> None:
    credential = await make_credential()
    settings = shared(make_settings, redis_server, rate_limit_default="3/minute")
    errors = 0

    def on_backend_error() -> None:
        nonlocal errors
        errors += 1

    async with security_app(settings) as running:
        limiter = running.state.rate_limiter
        assert limiter is not None
        limiter.on_backend_error = on_backend_error
        limiter.breaker_seconds = 0.5  # production: 5 s; short here so recovery is quick

        async def read() -> httpx.Response:
            return await running.client.get(f"{PROBE}/read", headers=credential.headers)

        assert [(await read()).status_code for _ in range(4)] == [200, 200, 200, 429]

        redis_server.stop()
        for _ in range(20):
            started = time.monotonic()
            response = await read()
            took = time.monotonic() - started
            assert response.status_code == 200, response.text  # over budget, but fail open
            assert took < 1.0, f"a request took {took:.2f}s with Redis down"
            await asyncio.sleep(0.05)
        assert errors >= 1
        # The breaker bounds the attempts: at most one per breaker window, not one per request.
        assert errors <= 20 * 0.1 / limiter.breaker_seconds + 2

        redis_server.start()  # empty: the budget starts again

        async def limited_again() -> bool:
            return (await read()).status_code == 429

        await poll_until(limited_again, timeout=10, interval=0.1)


async def test_hung_redis_costs_at_most_the_short_timeout(
    make_settings: Callable[..., Settings],
    make_credential: MakeCredential,
    redis_server: RedisServer,
) -> None:
    credential = await make_credential()
    settings = shared(make_settings, redis_server, rate_limit_default="3/minute")
    errors = 0

    def on_backend_error() -> None:
        nonlocal errors
        errors += 1

    async with security_app(settings) as running:
        limiter = running.state.rate_limiter
        assert limiter is not None
        limiter.on_backend_error = on_backend_error
        # Longer than the loop below can take on a loaded runner (production: 5 s): with 1 s,
        # a slow loop outlived the open circuit and met Redis's timeout a second time.
        limiter.breaker_seconds = 10.0
        assert (
            await running.client.get(f"{PROBE}/read", headers=credential.headers)
        ).status_code == 200
        # SIGSTOP: the TCP connection stays open but nothing answers - the worst case.
        redis_server.pause()
        try:
            timings = []
            for _ in range(5):
                started = time.monotonic()
                response = await running.client.get(f"{PROBE}/read", headers=credential.headers)
                timings.append(time.monotonic() - started)
                assert response.status_code == 200
        finally:
            redis_server.resume()

        # Back in business once it answers again: the connection cut mid-command by the timeout
        # left no stale reply behind (the budget of 3 was used by the first request only).
        async def limited_again() -> bool:
            response = await running.client.get(f"{PROBE}/read", headers=credential.headers)
            return response.status_code == 429

        await poll_until(limited_again, timeout=20, interval=0.1)
    assert max(timings) < 1.0, timings
    assert errors == 1  # the first timeout opened the circuit; the rest skipped Redis
