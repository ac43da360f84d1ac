"""SIGTERM from the engine (what `docker stop` and the kubelet send) drains the container: a
request already accepted completes, then the container exits 0 within the grace period."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Iterator

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit import libpq_url, port_open, wait_until

from .image_engine import Engine
from .imagekit import GATEWAY_SECRET, Served, start_served

pytestmark = pytest.mark.image

GRACEFUL_TIMEOUT = 15


def in_progress(metrics_url: str) -> float:
    text = httpx.get(metrics_url, timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "http_requests_in_progress"
        for sample in family.samples
    )


@pytest.fixture
def draining_server(engine: Engine, image: str, migrated_database: str) -> Iterator[Served]:
    server = start_served(
        engine,
        image,
        migrated_database,
        None,
        GUNICORN_GRACEFUL_TIMEOUT=str(GRACEFUL_TIMEOUT),
        WEB_CONCURRENCY="1",
    )
    try:
        wait_until(
            lambda: httpx.get(f"{server.url}/health/ready", timeout=5).status_code == 200,
            timeout=90,
            interval=0.5,
            what="/health/ready",
        )
        yield server
    finally:
        engine.remove(server.name)


def test_sigterm_completes_the_in_flight_request_and_exits_zero(
    draining_server: Served, engine: Engine, api_key: str, migrated_database: str
) -> None:
    server = draining_server
    title = f"in flight {uuid.uuid4()}"
    body = json.dumps({"title": title}).encode()
    head = (
        "POST /v1/tasks HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-API-Key: {api_key}\r\n"
        f"X-Gateway-Secret: {GATEWAY_SECRET}\r\n"
        f"Idempotency-Key: {uuid.uuid4()}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as client:
        # Headers and half the body: the request is accepted and in the app, waiting for the
        # rest, when the signal arrives.
        client.sendall(head + body[: len(body) // 2])
        wait_until(
            lambda: in_progress(server.metrics_url) >= 1,
            timeout=20,
            interval=0.1,
            what="the request in progress",
        )
        signalled = time.monotonic()
        engine("kill", "--signal", "TERM", server.name)
        # Draining: the listener closes (new connections are refused, not queued)...
        wait_until(lambda: not port_open(server.port), timeout=10, what="the API port closed")
        # ...while the accepted request still completes.
        client.sendall(body[len(body) // 2 :])
        response = b""
        while chunk := client.recv(65536):
            response += chunk
    status_line = response.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 201"), response[:500]

    waited = engine("wait", server.name, timeout=GRACEFUL_TIMEOUT + 30)
    took = time.monotonic() - signalled
    exit_code = int(waited.stdout.strip().splitlines()[-1])
    assert exit_code == 0, server.logs()[-4000:]
    assert took < GRACEFUL_TIMEOUT, f"took {took:.1f}s, grace is {GRACEFUL_TIMEOUT}s"

    async def stored() -> int:
        url = libpq_url(migrated_database)
        conn = await asyncpg.connect(url)
        try:
            count: int = await conn.fetchval("SELECT count(*) FROM tasks WHERE title = $1", title)
            return count
        finally:
            await conn.close()

    assert asyncio.run(stored()) == 1, "the request's transaction committed"
    logs = [json.loads(line) for line in server.logs().splitlines() if line.strip()]
    assert not [r for r in logs if r.get("level") in {"error", "critical"}], logs
