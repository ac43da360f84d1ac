"""The Prometheus multiprocess directory is emptied when the server starts.

Workers write their values to ``PROMETHEUS_MULTIPROC_DIR``; the master sums every file there on
each scrape. Files left by a previous run (a container restarted with the same volume, a
developer's second ``make serve``) would be summed in as if they were live, so the start-up
empties the directory (``service/entrypoints/server.py`` ``prepare_multiproc_dir``, called by
``python -m service serve`` and by gunicorn's ``on_starting`` hook in
``service/entrypoints/gunicorn_conf.py``). The harness does not touch the directory: it only
names it, and here the test names it explicitly through the setting.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from gunicorn_harness import REPO, running_gunicorn, sample, service_env
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from service.entrypoints.server import APP
from service.settings import Settings
from testkit import wait_until

pytestmark = pytest.mark.stack

ROUTE = "/health/live"
STALE_REQUESTS = 1_000_000
STALE_POOL_SIZE = 1_000
REQUESTS = 7

# A previous run's worker, as the app builds it: its own Metrics class (same names, same labels)
# in multiprocess mode, so what it leaves behind is exactly what a real worker leaves behind.
PREVIOUS_WORKER = f"""
import os
from service.observability.metrics import Metrics
from service.settings import load_settings

metrics = Metrics(load_settings())
metrics.http_requests.labels("GET", {ROUTE!r}, "200").inc({STALE_REQUESTS})
metrics.http_requests.labels("GET", "/v1/tasks", "500").inc({STALE_REQUESTS})
metrics.db_pool_size.set({STALE_POOL_SIZE})
print(os.getpid())
"""


def plant_previous_run(metrics_dir: Path) -> int:
    """Run a stand-in for a previous run's worker against ``metrics_dir``; its pid."""
    metrics_dir.mkdir(parents=True, exist_ok=True)
    env = service_env(environment="test", prometheus_multiproc_dir=metrics_dir)
    result = subprocess.run(
        [sys.executable, "-c", PREVIOUS_WORKER],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


def collected(metrics_dir: Path) -> str:
    """What a master would serve from ``metrics_dir`` as it is now."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
    return generate_latest(registry).decode()


@pytest.mark.parametrize("app", [None, APP], ids=["python-m-service-serve", "gunicorn-conf-only"])
def test_a_previous_runs_metric_files_are_removed_at_start(
    tmp_path: Path, database_url: str, app: str | None
) -> None:
    metrics_dir = tmp_path / "metrics"
    stale_pid = plant_previous_run(metrics_dir)
    stale_files = sorted(metrics_dir.glob(f"*_{stale_pid}.db"))
    # The planted files are real multiprocess files that a master would sum in.
    assert metrics_dir / f"counter_{stale_pid}.db" in stale_files
    before = collected(metrics_dir)
    assert sample(before, "http_requests_total", route=ROUTE) == STALE_REQUESTS
    assert sample(before, "db_pool_size") == STALE_POOL_SIZE

    with running_gunicorn(
        tmp_path / "server",
        database_url=database_url,
        app=app,
        workers=1,
        prometheus_multiproc_dir=metrics_dir,
    ) as server:
        with httpx.Client(base_url=server.url, timeout=5) as client:
            statuses = [client.get(ROUTE).status_code for _ in range(REQUESTS)]
        assert statuses == [200] * REQUESTS
        # The counter is written as the response ends; wait until the scrape has all of them.
        scrape = wait_until(
            lambda: (
                text
                if sample(text := server.scrape(), "http_requests_total", route=ROUTE) >= REQUESTS
                else None
            ),
            timeout=10,
            what=f"{REQUESTS} requests in the scrape",
        )
        left = sorted(metrics_dir.glob("*.db"))

    assert sample(scrape, "http_requests_total", method="GET", route=ROUTE) == REQUESTS
    assert sample(scrape, "http_requests_total", route=ROUTE, status_code="200") == REQUESTS
    # The previous run's other series is gone altogether, not merely outnumbered.
    assert sample(scrape, "http_requests_total", route="/v1/tasks") == 0
    pool_size = Settings.model_fields["sqlalchemy_pool_size"].default
    assert sample(scrape, "db_pool_size") == pool_size
    assert not set(stale_files) & set(left), f"stale files still there: {stale_files}"
    assert left, "the worker wrote no metric files: the directory was not the one in use"
