"""SIGTERM to a real gunicorn master drains: accepted requests finish, then exit 0.

The slow requests come from tests/stack/slow_app.py (the product app plus a test-only route).
They run on fresh connections, one each, as a load balancer's would.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest
from gunicorn_harness import poll, running_gunicorn, sample

from testkit import port_open

pytestmark = pytest.mark.stack

SLOW_APP = "slow_app:create_app_from_env()"
IN_FLIGHT = 8
GRACEFUL_TIMEOUT = 10


def fresh_connections(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
    )


async def test_sigterm_lets_accepted_requests_finish_and_exits_zero(
    tmp_path: Path, database_url: str
) -> None:
    with running_gunicorn(
        tmp_path,
        database_url=database_url,
        app=SLOW_APP,
        gunicorn_graceful_timeout=GRACEFUL_TIMEOUT,
    ) as server:
        workers = server.workers()
        async with fresh_connections(server.url) as client:
            in_flight = [
                asyncio.create_task(client.get("/_test/slow", params={"seconds": 2}))
                for _ in range(IN_FLIGHT)
            ]
            # Accepted and being served: the workers' own in-progress gauge says so.
            await poll(
                lambda: sample(server.scrape(), "http_requests_in_progress") == IN_FLIGHT,
                timeout=10,
                what="all requests in progress",
            )
            signalled = time.monotonic()
            server.signal(signal.SIGTERM)
            # The listening socket closes: a new connection is refused, not queued or failed.
            await poll(lambda: not port_open(server.port), timeout=5, what="port closed")
            responses = await asyncio.gather(*in_flight)
        code = await asyncio.to_thread(server.wait, GRACEFUL_TIMEOUT + 5)
        took = time.monotonic() - signalled

    assert [r.status_code for r in responses] == [200] * IN_FLIGHT
    # Each request saw its worker draining: readiness answered 503 from the signal on.
    assert all(r.json()["draining"] for r in responses)
    assert {r.json()["pid"] for r in responses} <= workers
    assert code == 0, server.output()[-3000:]
    assert took < GRACEFUL_TIMEOUT
    records = server.log_records()
    # The lifespan shutdown ran in every worker: the engines were disposed.
    assert sum(r["event"] == "app_stopped" for r in records) == 2
    assert not any(r["level"] in {"error", "critical"} for r in records), records


async def test_requests_outliving_the_graceful_timeout_are_cut_but_shutdown_completes(
    tmp_path: Path, database_url: str
) -> None:
    with running_gunicorn(
        tmp_path, database_url=database_url, app=SLOW_APP, gunicorn_graceful_timeout=4
    ) as server:
        async with fresh_connections(server.url) as client:
            stuck = asyncio.create_task(client.get("/_test/slow", params={"seconds": 30}))
            await poll(
                lambda: sample(server.scrape(), "http_requests_in_progress") == 1,
                timeout=10,
                what="request in progress",
            )
            signalled = time.monotonic()
            server.signal(signal.SIGTERM)
            code = await asyncio.to_thread(server.wait, 15)
            took = time.monotonic() - signalled
            outcome = await asyncio.gather(stuck, return_exceptions=True)

    assert code == 0
    assert took < 4 + 1
    # uvicorn gave up on the request before gunicorn's deadline, so the lifespan shutdown (engine
    # disposal) still ran instead of the master SIGKILLing the worker.
    assert sum(r["event"] == "app_stopped" for r in server.log_records()) == 2
    response = outcome[0]
    assert isinstance(response, Exception) or (
        isinstance(response, httpx.Response) and response.status_code >= 500
    )


async def test_sigint_is_a_quick_shutdown(tmp_path: Path, database_url: str) -> None:
    with running_gunicorn(
        tmp_path,
        database_url=database_url,
        app=SLOW_APP,
        gunicorn_graceful_timeout=GRACEFUL_TIMEOUT,
    ) as server:
        async with fresh_connections(server.url) as client:
            pending = asyncio.create_task(client.get("/_test/slow", params={"seconds": 30}))
            await poll(
                lambda: sample(server.scrape(), "http_requests_in_progress") == 1,
                timeout=10,
                what="request in progress",
            )
            signalled = time.monotonic()
            server.signal(signal.SIGINT)
            code = await asyncio.to_thread(server.wait, GRACEFUL_TIMEOUT)
            took = time.monotonic() - signalled
            await asyncio.gather(pending, return_exceptions=True)

    assert code == 0
    # The master sends SIGQUIT: the workers leave at once instead of waiting for SIGKILL.
    assert took < 3
    assert sum(r["event"] == "worker_interrupted" for r in server.log_records()) == 2
