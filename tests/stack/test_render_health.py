"""render.yaml's deploy, played for real: the pre-deploy command migrates an empty PostgreSQL,
the image's start command serves with the blueprint's settings, and the health check path
answers as Render needs while the database comes and goes.

Render's one health check gates deploys (a new instance must pass it) and restarts running
instances (after 60 s of failures). So the path must fail while a fresh instance cannot reach
its database, and must keep passing when the database goes away later: a restart would not
bring it back, and would drop the requests in flight.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gunicorn_harness import Gunicorn, running_gunicorn, service_env
from renderkit import blueprint, resolved_env, web_service

from service.tools.embedded_postgres import EmbeddedPostgres
from testkit import wait_until

pytestmark = pytest.mark.stack

WORKERS = 2
# Enough calls that every worker answers some (each keeps its own state).
CALLS = 12


@pytest.fixture
def postgres() -> Iterator[EmbeddedPostgres]:
    """This test's own PostgreSQL: the tests stop it, the session's shared one must not. In its
    own temp dir, not pytest's: a pytest session starting elsewhere on the machine resets
    /tmp/pytest-of-<user> to 0700, and the unprivileged server user could no longer reach it."""
    work = Path(tempfile.mkdtemp(prefix="render-health-"))
    server = EmbeddedPostgres(work / "pg")
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def blueprint_settings(database_url: str, **overrides: Any) -> dict[str, Any]:
    """The web service's variables as Render would set them, with the test's database. Host,
    ports and workers are the harness's: loopback and free ports (the blueprint's 0.0.0.0 and
    port are asserted in tests/deploy)."""
    env = resolved_env(blueprint())
    for owned_by_the_harness in ("HOST", "PORT", "METRICS_PORT", "WEB_CONCURRENCY"):
        env.pop(owned_by_the_harness)
    env.update(
        DATABASE_URL=database_url,
        DATABASE_MIGRATION_URL=database_url,
        # No Key Value here; the rate limits are not what this test is about.
        REDIS_URL="",
        RATE_LIMIT_ENABLED="false",
    )
    env.update({key.upper(): str(value) for key, value in overrides.items()})
    return {key.lower(): value for key, value in env.items()}


def statuses(server: Gunicorn, path: str) -> set[int]:
    return {httpx.get(f"{server.url}{path}", timeout=10).status_code for _ in range(CALLS)}


def test_pre_deploy_then_a_deploy_gated_on_the_database_then_no_restart_when_it_goes(
    tmp_path: Path, postgres: EmbeddedPostgres
) -> None:
    service = web_service(blueprint())
    settings = blueprint_settings(postgres.url)
    pre_deploy = service["preDeployCommand"].split()
    assert pre_deploy[0] == "python"
    migrated = subprocess.run(
        [sys.executable, *pre_deploy[1:]],
        env=service_env(**settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr
    # Production logs JSON, the pre-deploy step's output included.
    done = [json.loads(line) for line in migrated.stdout.splitlines() if line.startswith("{")]
    assert any(r["event"] == "migrate_done" and r["before"] == [] for r in done), migrated.stdout

    health = service["healthCheckPath"]
    postgres.stop()
    with running_gunicorn(
        tmp_path / "app", workers=WORKERS, wait_ready=False, **settings
    ) as server:
        # The harness's 20 s is tight for two workers on a loaded two-core machine.
        server.wait_workers(WORKERS, timeout=120)
        # A new instance that cannot reach its database: the deploy is not promoted (Render
        # keeps the old instances), and the process is not crash-looping either.
        response = httpx.get(f"{server.url}{health}", timeout=10)
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"].endswith("/unavailable")
        assert statuses(server, health) == {503}
        assert statuses(server, "/health/live") == {200}

        # The database answers: the health check passes on every worker.
        postgres.start()
        wait_until(
            lambda: statuses(server, health) == {200},
            timeout=30,
            interval=0.5,
            what="the health check passing on every worker",
        )

        # The database goes away while serving: readiness and the summary say so, but the
        # check Render acts on keeps passing, so no instance is restarted for it.
        postgres.stop()
        assert statuses(server, "/health/ready") == {503}
        assert statuses(server, "/health") == {503}
        assert statuses(server, health) == {200}
