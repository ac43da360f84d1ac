"""Prometheus multiprocess mode under a real 2-worker gunicorn, scraped on the metrics port."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import httpx
import pytest
from gunicorn_harness import Gunicorn, running_gunicorn, sample
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from service.settings import Settings
from testkit import wait_until

pytestmark = pytest.mark.stack

ROUTE = "/health/live"


def per_worker_totals(server: Gunicorn) -> dict[int, float]:
    """Requests to ROUTE counted in each worker's own file (collected one file at a time)."""
    totals: dict[int, float] = {}
    for path in server.metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.removeprefix("counter_"))
        alone = server.metrics_dir.parent / f"one-{pid}"
        alone.mkdir(exist_ok=True)
        shutil.copy(path, alone / path.name)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(alone))
        totals[pid] = sample(generate_latest(registry).decode(), "http_requests_total", route=ROUTE)
    return totals


async def burst(base_url: str, count: int) -> list[int]:
    # A fresh connection per request, so the kernel hands them to whichever worker accepts.
    async with httpx.AsyncClient(
        base_url=base_url, limits=httpx.Limits(max_keepalive_connections=0), timeout=10
    ) as client:
        responses = await asyncio.gather(*(client.get(ROUTE) for _ in range(count)))
    return [r.status_code for r in responses]


async def test_scrape_sums_requests_served_by_both_workers(
    tmp_path: Path, database_url: str
) -> None:
    with running_gunicorn(tmp_path, database_url=database_url, workers=2) as server:
        workers = server.workers()
        sent = 0
        totals: dict[int, float] = {}
        for _ in range(10):  # until both workers have served some (the kernel decides)
            statuses = await burst(server.url, 40)
            assert statuses == [200] * 40
            sent += 40
            totals = per_worker_totals(server)
            if all(totals.get(pid, 0) > 0 for pid in workers):
                break
        print(f"{sent} requests; per worker: {totals}")
        scrape = server.scrape()

        # A worker dies: its counts stay in the total, its live gauges leave the aggregate.
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: sum(r["event"] == "app_started" for r in server.log_records()) == 3,
            timeout=20,
            what="replacement worker started",
        )
        wait_until(
            lambda: not list(server.metrics_dir.glob(f"gauge_live*_{victim}.db")),
            timeout=10,
            what="dead worker's live gauges removed",
        )
        after_death = server.scrape()

    assert all(totals[pid] > 0 for pid in workers), totals
    assert sum(totals.values()) == sent
    assert sample(scrape, "http_requests_total", route=ROUTE, status_code="200") == sent
    assert sample(scrape, "http_request_duration_seconds_count", route=ROUTE) == sent
    assert sample(after_death, "http_requests_total", route=ROUTE) == sent
    # Live gauges are summed over live workers only: two pools before, two after the respawn.
    pool_size = Settings.model_fields["sqlalchemy_pool_size"].default
    assert sample(scrape, "db_pool_size") == sample(after_death, "db_pool_size") == 2 * pool_size
    assert sample(after_death, "app_info", environment="test") == 1
