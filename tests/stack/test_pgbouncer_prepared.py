"""The stack as the chart runs it: a PgBouncer that tracks prepared statements (>= 1.21; here
the 1.24 ``make pgbouncer`` builds) and the app in ``pgbouncer-prepared`` mode.

The shared stack of the other tests runs Debian's 1.18 in ``pgbouncer-transaction`` mode. What
changes with the caches on is checked here, on a stack of its own:

- the API works end to end (``python -m service smoke`` through Nginx);
- a read is one statement through PgBouncer, no ``BEGIN``/``COMMIT`` around it, and nothing is
  parsed again once a connection has met the statement (PgBouncer's ``SHOW STATS``);
- PostgreSQL going away under load keeps the outage promises (outage.py). Its server
  connections die with their prepared statements while the app's caches still hold them, so
  PgBouncer must prepare them again on the new server connections.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import httpx
import pytest
from outage import assert_outage_promises, measure_outage, timeline
from traffic import Tenant

from testkit import require_binary, skip_or_fail
from tools.kit import REPO, find_pgbouncer
from tools.stack import Stack

pytestmark = pytest.mark.stack

APP_ENV = {
    "RATE_LIMIT_ENABLED": "false",
    "LOG_LEVEL": "INFO",
    # A key verified once stays verified for the whole test: no lookup inside a counted window.
    "API_KEY_CACHE_TTL_SECONDS": "3600",
}


@pytest.fixture(scope="module")
def prepared_stack() -> Iterator[Stack]:
    require_binary("nginx")
    if find_pgbouncer(prepared_statements=True) is None:
        skip_or_fail("PgBouncer >= 1.21 is not installed (make pgbouncer builds one)")
    with Stack(
        app_instances=1,
        workers=2,
        app_env=APP_ENV,
        nginx_env={"LIMIT_REQ_RATE": "100000r/s", "LIMIT_REQ_BURST": "100000"},
        pgbouncer_prepared=True,
    ) as stack:
        yield stack


@pytest.fixture
def tenant(prepared_stack: Stack) -> Tenant:
    prepared_stack.heal()
    name = f"tenant-{uuid.uuid4().hex[:12]}"
    return Tenant(name, prepared_stack.create_api_key(name))


def _app_stats(stack: Stack) -> dict[str, int]:
    row = next(r for r in stack.pgbouncer_show("SHOW STATS") if r["database"] == "app")
    return {key: int(value) for key, value in row.items() if key.startswith("total_")}


def test_the_app_runs_in_prepared_mode_and_passes_the_smoke_test(
    prepared_stack: Stack, tenant: Tenant
) -> None:
    assert prepared_stack.pool_mode == "pgbouncer-prepared"
    env = prepared_stack.app_environment(prepared_stack.instances[0])
    assert env["DATABASE_POOL_MODE"] == "pgbouncer-prepared"
    assert "pgbouncer-prepared mode" in prepared_stack.pgbouncer_description()
    config = {r["key"]: r["value"] for r in prepared_stack.pgbouncer_show("SHOW CONFIG")}
    assert int(config["max_prepared_statements"]) > 0
    metrics = prepared_stack.instances[0].metrics_url
    result = subprocess.run(
        [
            *(sys.executable, "-m", "service", "smoke", "--url", prepared_stack.url),
            *("--api-key", tenant.key, "--metrics-url", metrics),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_read_is_one_statement_through_pgbouncer_and_is_not_parsed_again(
    prepared_stack: Stack, tenant: Tenant
) -> None:
    reads = 200
    with httpx.Client(base_url=prepared_stack.url, headers=tenant.headers, timeout=10) as client:
        created = client.post("/v1/tasks", json={"title": "prepared"})
        assert created.status_code == 201, created.text
        path = f"/v1/tasks/{created.json()['id']}"
        # One request at a time: each worker keeps reusing one pooled connection, which meets
        # the statement here, before the counted window.
        for _ in range(20):
            assert client.get(path).status_code == 200
        before = _app_stats(prepared_stack)
        for _ in range(reads):
            response = client.get(path)
            assert response.status_code == 200, response.text
        after = _app_stats(prepared_stack)
    delta = {key: after[key] - before[key] for key in before}
    # One statement and one transaction per read: no BEGIN READ ONLY / COMMIT around it.
    assert delta["total_bind_count"] == reads, delta
    assert delta["total_query_count"] == reads, delta
    assert delta["total_xact_count"] == reads, delta
    # Executed from the app's statement cache: no Parse from the app, none from PgBouncer.
    assert delta["total_client_parse_count"] == 0, delta
    assert delta["total_server_parse_count"] == 0, delta


def test_postgres_down_for_10s_under_load_in_prepared_mode(
    prepared_stack: Stack, tenant: Tenant
) -> None:
    before = _app_stats(prepared_stack)
    result = measure_outage(
        prepared_stack,
        tenant,
        stop=lambda: prepared_stack.stop_postgres(mode="fast"),
        start=prepared_stack.start_postgres,
        down_for=10.0,
    )
    print(f"\nPostgreSQL outage (pgbouncer-prepared): {result.figures()}\n{timeline(result)}")
    assert_outage_promises(result)
    after = _app_stats(prepared_stack)
    # The statements were prepared again on the new server connections: by PgBouncer.
    assert after["total_server_parse_count"] > before["total_server_parse_count"]
