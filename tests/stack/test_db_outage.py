"""A real PostgreSQL stops under a real gunicorn, then comes back: fast 503s, self-healing.

The test owns its PostgreSQL (the session's shared one must keep running for everyone else).
API_KEY_CACHE_TTL_SECONDS=0 makes every request take the API-key lookup's own database path,
so that path's behaviour is what the first half of each request measures.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from gunicorn_harness import poll, running_gunicorn

from service.db import Database
from service.migrate import upgrade
from service.security.api_keys import ApiKeyRepository
from service.security.principal import owner_id_from
from service.settings import load_settings
from service.tools.embedded_postgres import EmbeddedPostgres

pytestmark = pytest.mark.stack

CONNECT_TIMEOUT = 1.0
# The bound plus scheduling slack on a busy 2-core CI runner.
ANSWER_WITHIN = CONNECT_TIMEOUT + 1.0
RECOVER_WITHIN = 5.0


async def mint_key(url: str) -> str:
    database = Database(load_settings(environment="test", database_url=url))
    try:
        async for session in database.session():
            key, _ = await ApiKeyRepository(session).create(
                owner_id=owner_id_from("outage"), scopes=["tasks:read", "tasks:write"]
            )
    finally:
        await database.dispose()
    return key


async def timed(client: httpx.AsyncClient, method: str, path: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await client.request(method, path, json={"title": "t"} if method == "POST" else None)
    return response, time.monotonic() - started


async def test_database_outage_is_fast_503s_and_heals_itself(tmp_path: Path) -> None:
    server_pg = EmbeddedPostgres(tmp_path / "pg").start()
    try:
        await upgrade(server_pg.url)
        key = await mint_key(server_pg.url)
        with running_gunicorn(
            tmp_path / "app",
            database_url=server_pg.url,
            database_connect_timeout=CONNECT_TIMEOUT,
            api_key_cache_ttl_seconds=0,
        ) as server:
            workers = server.workers()
            async with httpx.AsyncClient(
                base_url=server.url, headers={"X-API-Key": key}, timeout=30
            ) as client:
                assert (await client.get("/v1/tasks")).status_code == 200
                assert (await client.get("/health/ready")).status_code == 200

                await asyncio.to_thread(server_pg.stop)
                during: list[tuple[str, httpx.Response, float]] = []
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    for method, path in (
                        ("GET", "/v1/tasks"),
                        ("POST", "/v1/tasks"),
                        ("GET", "/health/ready"),
                        ("GET", "/health/live"),
                    ):
                        response, took = await timed(client, method, path)
                        during.append((f"{method} {path}", response, took))
                scrape_down = server.scrape()

                await asyncio.to_thread(server_pg.start)
                back = time.monotonic()
                await poll(
                    lambda: _ok(client), timeout=RECOVER_WITHIN, interval=0.1, what="recovery"
                )
                recovered_after = time.monotonic() - back
                after = [await client.get("/v1/tasks") for _ in range(10)]
                ready = await client.get("/health/ready")
                workers_after = server.workers()
    finally:
        server_pg.stop(mode="immediate")

    assert during
    for name, response, took in during:
        assert took <= ANSWER_WITHIN, (name, took)
        if name == "GET /health/live":
            assert response.status_code == 200
            continue
        assert response.status_code == 503, (name, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        if name != "GET /health/ready":
            assert int(response.headers["retry-after"]) > 0
    assert "db_up 0.0" in scrape_down
    assert recovered_after <= RECOVER_WITHIN
    assert [r.status_code for r in after] == [200] * 10
    assert ready.status_code == 200
    # Nothing restarted: the same workers served before, during and after.
    assert workers_after == workers


async def _ok(client: httpx.AsyncClient) -> bool:
    return (await client.get("/v1/tasks")).status_code == 200
