"""Everything a real gunicorn writes, under requests that carry secrets, contains none of them.

The server runs at DEBUG with every secret setting filled in (gateway secrets, JWT key, database
passwords, Redis and Sentry credentials) and a real API key; requests put those values in
headers, cookies, query strings and request ids, and hit the failure paths (403, 401, 404,
422, a database that refuses connections, a Redis that does not answer). Then the whole of
stdout and stderr is searched.
"""

from __future__ import annotations

import json
import secrets
import signal
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import pytest
from gunicorn_harness import running_gunicorn

from testkit import free_port

pytestmark = pytest.mark.stack

ACCESS_FIELDS = {
    "method",
    "route",
    "path",
    "status",
    "duration_ms",
    "request_id",
    "client_ip",
    "principal",
}


def token(prefix: str) -> str:
    return f"{prefix}-{secrets.token_urlsafe(24)}"


async def test_no_secret_reaches_any_log_line(
    tmp_path: Path, database_url: str, make_credential: Callable[..., Awaitable[Any]]
) -> None:
    credential = await make_credential()
    gateway, previous, jwt_key = token("gw"), token("gwold"), token("jwtkey")
    read_password, redis_password, sentry_key = token("readpw"), token("redispw"), token("sntry")
    db_password = urlsplit(database_url).password
    assert db_password
    closed = free_port()
    secrets_used = {
        "gateway": gateway,
        "gateway previous": previous,
        "jwt key": jwt_key,
        "db password": db_password,
        "read replica password": read_password,
        "redis password": redis_password,
        "sentry key": sentry_key,
        "api key": credential.key,
        "api key secret part": credential.key.split("_", 2)[2],
    }
    gw = {"X-Gateway-Secret": gateway}
    key = {**gw, **credential.headers}

    with running_gunicorn(
        tmp_path,
        database_url=database_url,
        environment="staging",
        log_level="DEBUG",
        gateway_shared_secret=gateway,
        gateway_shared_secret_previous=previous,
        jwt_secret_key=jwt_key,
        database_read_url=f"postgresql://app:{read_password}@127.0.0.1:{closed}/app",
        database_connect_timeout=1,
        rate_limit_enabled="true",
        redis_url=f"redis://:{redis_password}@127.0.0.1:{closed}/0",
        sentry_dsn=f"http://{sentry_key}@127.0.0.1:{closed}/1",
    ) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            statuses = {
                "created": (await client.post("/v1/tasks", json={"title": "t"}, headers=key)),
                "read replica down": await client.get("/v1/tasks", headers=key),
                # Writes use the primary; reads would go to the (dead) replica.
                "not found": await client.delete(
                    f"/v1/tasks/{uuid.uuid4()}",
                    headers={**gw, "Authorization": f"Bearer {credential.key}"},
                ),
                "invalid": await client.post("/v1/tasks", json={"title": ""}, headers=key),
                "bad key": await client.get(
                    "/v1/tasks", headers={**gw, "X-API-Key": "fa_abcdefghijkl_" + "x" * 43}
                ),
                "secret as bearer": await client.get(
                    "/v1/tasks", headers={**gw, "Authorization": f"Bearer {jwt_key}"}
                ),
                "forged jwt": await client.get(
                    "/v1/tasks",
                    headers={
                        **gw,
                        "Authorization": "Bearer "
                        + jwt.encode({"sub": "x", "exp": 1}, jwt_key, algorithm="HS256"),
                    },
                ),
                "no gateway": await client.get("/v1/tasks", headers=credential.headers),
                "wrong gateway": await client.get(
                    "/v1/tasks", headers={"X-Gateway-Secret": jwt_key}
                ),
                "cookie and query": await client.get(
                    f"/health/live?api_key={credential.key}&token={gateway}",
                    headers={"Cookie": f"session={gateway}; other={redis_password}"},
                ),
                "secret as request id": await client.get(
                    "/health/ready", headers={"X-Request-ID": db_password}
                ),
            }
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0
        stdout = server.stdout_path.read_text()
        stderr = server.stderr_path.read_text()

    codes = {name: response.status_code for name, response in statuses.items()}
    assert codes == {
        "created": 201,
        # The read runs on the primary when the replica refuses (docs/read-replica.md); the
        # replica's failures still reach the log, through the replica monitor and the fallback.
        "read replica down": 200,
        "not found": 404,
        "invalid": 422,
        "bad key": 401,
        "secret as bearer": 401,
        "forged jwt": 401,
        "no gateway": 403,
        "wrong gateway": 403,
        "cookie and query": 200,
        "secret as request id": 200,
    }
    everything = stdout + stderr
    for name, value in secrets_used.items():
        assert value not in everything, f"the {name} leaked into the logs"
    assert "Traceback" not in everything
    assert not stderr.strip(), stderr[:2000]

    records = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    for record in records:
        assert {"timestamp", "level", "event", "logger"} <= set(record), record
    access = [r for r in records if r["logger"] == "service.access"]
    assert len(access) == len(statuses)
    for record in access:
        assert set(record) >= ACCESS_FIELDS, record
    principals = {r["principal"] for r in access if r["status"] in {201, 404, 422}}
    assert principals == {credential.prefix}
    # The failures were logged, from every layer, without their secrets.
    events = {r["event"] for r in records}
    # The dead replica (its URL has a password): noticed, logged as a warning, reads moved to
    # the primary; no 503 any more, and no driver message that could carry the URL.
    assert any(r["event"] == "replica_unavailable" and r["level"] == "warning" for r in records)
    assert "rate_limit_backend_unavailable" in events  # Redis (its URL has a password)
    # A secret sent as the request id is masked in the line that carries it.
    assert any(r["path"] == "/health/ready" and r["request_id"] == "***" for r in access)
    loggers = {r["logger"] for r in records}
    assert {"gunicorn.error", "uvicorn.error", "service.access"} <= loggers
