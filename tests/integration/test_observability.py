"""Request ids, access log lines and metrics on the real app (in-process, real PostgreSQL)."""

from __future__ import annotations

import json
import random
import string
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import structlog
from fastapi import FastAPI
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import appkit
from service.app import create_app
from service.http.state import app_runtime
from service.observability.logging import configure_logging
from service.observability.metrics import start_metrics_server
from service.settings import Settings
from testkit import free_port, wait_until

MakeCredential = Callable[..., Awaitable[Any]]  # conftest's make_credential


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app (to read its metrics) and a client on it, from a documentation address."""
    async with appkit.serving(settings, client_address=("198.51.100.9", 4711)) as served:
        yield served.app, served.client


@pytest.fixture
def info_settings(make_settings: Callable[..., Settings]) -> Any:
    yield make_settings(log_level="INFO")
    configure_logging(make_settings())  # back to the quiet default for the tests after


def samples(app: FastAPI, name: str) -> list[tuple[dict[str, str], float]]:
    text = generate_latest(app_runtime(app).metrics.registry).decode()
    return [
        (item.labels, item.value)
        for family in text_string_to_metric_families(text)
        for item in family.samples
        if item.name == name
    ]


def value(app: FastAPI, name: str, **labels: str) -> float:
    return sum(v for found, v in samples(app, name) if labels.items() <= found.items())


ACCESS_FIELDS = ("method", "route", "path", "status", "duration_ms", "client_ip", "principal")


def json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


# --- request ids ------------------------------------------------------------------------------


async def test_request_id_is_generated_and_echoed_with_the_correlation_id(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/health/live")
    request_id = response.headers["x-request-id"]
    assert len(request_id) == 32
    int(request_id, 16)
    assert response.headers["x-correlation-id"] == request_id
    other = await client.get("/health/live")
    assert other.headers["x-request-id"] != request_id


@pytest.mark.parametrize(
    "incoming",
    ["gateway-req.0001", "A" * 128, "0b6f8a4e-8f0e-4a4e-9c55-7b8f7c7f0c11"],
)
async def test_a_valid_incoming_request_id_is_kept(
    client: httpx.AsyncClient, incoming: str
) -> None:
    response = await client.get("/nope", headers={"X-Request-ID": incoming})
    assert response.headers["x-request-id"] == incoming
    assert response.json()["request_id"] == incoming


@pytest.mark.parametrize(
    "incoming",
    ["short", "A" * 129, "has space in it", 'quote"inject', "new\\nline-injected", "é" * 10],
)
async def test_an_invalid_incoming_request_id_is_replaced(
    client: httpx.AsyncClient, incoming: str
) -> None:
    response = await client.get("/nope", headers=[(b"X-Request-ID", incoming.encode())])
    generated = response.headers["x-request-id"]
    assert generated != incoming
    assert len(generated) == 32
    assert response.json()["request_id"] == generated


async def test_correlation_id_is_passed_on(client: httpx.AsyncClient) -> None:
    only_correlation = await client.get("/health/live", headers={"X-Correlation-ID": "trace-12345"})
    assert only_correlation.headers["x-request-id"] == "trace-12345"
    assert only_correlation.headers["x-correlation-id"] == "trace-12345"

    both = await client.get(
        "/health/live", headers={"X-Request-ID": "hop-000001", "X-Correlation-ID": "trace-12345"}
    )
    assert both.headers["x-request-id"] == "hop-000001"
    assert both.headers["x-correlation-id"] == "trace-12345"


# --- access log -------------------------------------------------------------------------------


async def test_one_access_line_per_request_with_route_template_and_principal(
    info_settings: Settings,
    make_credential: MakeCredential,
    capsys: pytest.CaptureFixture[str],
) -> None:
    credential = await make_credential()
    task_id = uuid.uuid4()
    async with serving(info_settings) as (_, client):
        capsys.readouterr()
        response = await client.get(
            f"/v1/tasks/{task_id}", headers={**credential.headers, "X-Request-ID": "req-access-1"}
        )
        anonymous = await client.get("/v1/tasks", headers={"X-Request-ID": "req-access-2"})
        lines = json_lines(capsys.readouterr().out)

    assert response.status_code == 404
    assert anonymous.status_code == 401
    access = [line for line in lines if line["event"] == "request"]
    assert len(access) == 2
    first, second = access
    assert first["method"] == "GET"
    assert first["route"] == "/v1/tasks/{task_id}"
    assert first["path"] == f"/v1/tasks/{task_id}"
    assert first["status"] == 404
    assert first["request_id"] == "req-access-1"
    assert first["client_ip"] == "198.51.100.9"
    assert first["principal"] == credential.prefix
    assert isinstance(first["duration_ms"], float)
    assert first["logger"] == "service.access"
    assert first["level"] == "info"
    assert "timestamp" in first
    assert second["principal"] is None
    assert second["request_id"] == "req-access-2"
    # The key itself appears nowhere.
    assert credential.key not in json.dumps(lines)
    assert credential.key.split("_", 2)[2] not in json.dumps(lines)


async def test_the_access_line_is_the_line_the_stdlib_pipeline_writes(
    info_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """The access line skips the standard library (a profiled cost), not a processor: the same
    keys in the same order, the same redaction, as the same event logged the ordinary way."""
    async with serving(info_settings) as (_, client):
        capsys.readouterr()
        secret_path = "/v1/tasks/fa_abcdefghijkl_SECRETSECRETSECRET"
        await client.get(secret_path, headers={"X-Request-ID": "req-same-line"})
        (direct,) = [
            line for line in json_lines(capsys.readouterr().out) if line["event"] == "request"
        ]
        structlog.contextvars.bind_contextvars(request_id="req-same-line")
        try:
            structlog.get_logger("service.access").info(
                "request", **{k: direct[k] for k in ACCESS_FIELDS}
            )
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
        (ordinary,) = json_lines(capsys.readouterr().out)

    assert list(direct) == list(ordinary)
    assert {k: v for k, v in direct.items() if k != "timestamp"} == {
        k: v for k, v in ordinary.items() if k != "timestamp"
    }
    assert "SECRETSECRET" not in direct["path"]
    assert direct["path"] == "/v1/tasks/fa_abcdefghijkl_***"


async def test_the_access_line_follows_the_log_level(
    make_settings: Callable[..., Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    def add_boom(app: FastAPI) -> None:
        @app.get("/_test/boom")
        async def boom() -> None:
            raise RuntimeError("boom")

    async with appkit.serving(make_settings(log_level="WARNING"), prepare=add_boom) as served:
        capsys.readouterr()
        assert (await served.client.get("/health/live")).status_code == 200
        assert (await served.client.get("/_test/boom")).status_code == 500
        lines = json_lines(capsys.readouterr().out)
    configure_logging(make_settings())

    access = [line for line in lines if line["event"] == "request"]
    assert [(line["path"], line["level"]) for line in access] == [("/_test/boom", "warning")]


async def test_log_lines_inside_a_request_carry_its_request_id(
    info_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    def add_crash(app: FastAPI) -> None:
        @app.get("/_test/crash")
        async def crash() -> None:
            raise RuntimeError("SELECT secret FROM t WHERE password='hunter2'")

    async with appkit.serving(info_settings, prepare=add_crash) as served:
        capsys.readouterr()
        response = await served.client.get("/_test/crash", headers={"X-Request-ID": "req-crash-1"})
        lines = json_lines(capsys.readouterr().out)

    assert response.status_code == 500
    crash_line = next(line for line in lines if line["event"] == "unhandled_exception")
    assert crash_line["request_id"] == "req-crash-1"
    access = next(line for line in lines if line["event"] == "request")
    assert access["status"] == 500
    assert access["level"] == "warning"
    output = json.dumps(lines)
    assert "hunter2" not in output
    assert "SELECT" not in output
    assert "Traceback" not in output


# --- metrics ----------------------------------------------------------------------------------


async def test_route_label_is_the_template_and_random_paths_share_one_series(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    rng = random.Random(1234)
    async with serving(make_settings()) as (app, client):
        for _ in range(1000):
            depth = rng.randint(1, 4)
            path = "/" + "/".join(
                "".join(rng.choices(string.ascii_letters + string.digits, k=rng.randint(1, 12)))
                for _ in range(depth)
            )
            await client.get(path)
        for _ in range(3):
            await client.get(f"/v1/tasks/{uuid.uuid4()}", headers=credential.headers)
        await client.request("PURGE", "/health/live")

        series = samples(app, "http_requests_total")
        assert value(app, "http_requests_total", route="<unmatched>", status_code="404") >= 1000
        assert value(app, "http_requests_total", route="/v1/tasks/{task_id}") == 3
        assert value(app, "http_requests_total", method="OTHER", route="/health/live") == 1
        # 1,003 requests, a handful of series: the raw path never becomes a label.
        assert len(series) <= 5
        assert all(labels["method"] in {"GET", "OTHER"} for labels, _ in series)
        durations = samples(app, "http_request_duration_seconds_count")
        assert len(durations) <= 4


async def test_pool_query_and_readiness_metrics(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    async with serving(make_settings(sqlalchemy_pool_size=3)) as (app, client):
        before = value(app, "db_query_duration_seconds_count")
        assert (await client.get("/health/ready")).status_code == 200
        listed = await client.get("/v1/tasks", headers=credential.headers)
        assert listed.status_code == 200
        assert value(app, "db_query_duration_seconds_count") >= before + 2
        assert value(app, "db_up") == 1
        assert value(app, "db_pool_size") == 3
        # Everything was returned to the pool.
        assert value(app, "db_pool_checked_out") == 0
        assert value(app, "db_pool_overflow") == 0
        assert value(app, "http_requests_in_progress") == 0
        assert value(app, "app_info", version=app.version, environment="test") == 1


async def test_pool_gauges_follow_checkouts(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(sqlalchemy_pool_size=1, sqlalchemy_pool_overflow=2)
    app = create_app(settings)
    async with app.router.lifespan_context(app) as state:
        assert state is not None
        engine = state["app_state"].database.engine
        connections = [await engine.connect() for _ in range(3)]
        try:
            assert value(app, "db_pool_checked_out") == 3
            assert value(app, "db_pool_overflow") == 2
        finally:
            for connection in connections:
                await connection.close()
        assert value(app, "db_pool_checked_out") == 0
        assert value(app, "db_pool_overflow") == 0


async def test_database_down_counts_retries_and_reports_db_down(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    down = f"postgresql+asyncpg://app:pw@127.0.0.1:{free_port()}/app"
    settings = make_settings(database_url=down, database_connect_timeout=1)
    async with serving(settings) as (app, client):
        response = await client.get("/v1/tasks", headers=credential.headers)
        ready = await client.get("/health/ready")
        assert response.status_code == 503
        assert ready.status_code == 503
        assert value(app, "db_up") == 0
        assert value(app, "db_connect_retries_total") >= 1


async def test_rate_limit_counters_are_wired(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(rate_limit_enabled=True, rate_limit_per_ip="2/minute")
    async with serving(settings) as (app, client):
        statuses = [(await client.get("/v1/tasks")).status_code for _ in range(3)]
        assert statuses == [401, 401, 429]
        assert value(app, "rate_limit_exceeded_total", scope="ip") == 1

    broken = make_settings(rate_limit_enabled=True, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with serving(broken) as (app, client):
        # Fails open: the request goes on (401 for no credential), the failure is counted.
        assert (await client.get("/v1/tasks")).status_code == 401
        assert value(app, "rate_limit_backend_errors_total") >= 1


async def test_single_process_metrics_server_serves_the_app_registry(
    make_settings: Callable[..., Settings],
) -> None:
    async with serving(make_settings()) as (app, client):
        await client.get("/health/live")
        port = free_port()
        server = start_metrics_server(port, "127.0.0.1", app_runtime(app).metrics.registry)
        try:
            text = wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/metrics").text, timeout=5)
        finally:
            server.shutdown()
            server.server_close()
    assert 'http_requests_total{method="GET",route="/health/live",status_code="200"}' in text
    assert "process_resident_memory_bytes" in text
