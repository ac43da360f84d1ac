"""The metric names the dashboards and alerts rely on, checked against a real scrape.

tests/deploy checks the Grafana dashboard and the PrometheusRule against a hand-written list of
series (``CONTRACT_*`` in tests/deploy/conftest.py). Here the real app, built from its real
settings with its lifespan running, serves a few real requests and its own registry is scraped
over HTTP the way ``make run`` serves it (``start_metrics_server``); the list and every series
the rendered chart queries must be in that scrape, with samples, not just declared.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from replicakit import eventually

import appkit
from service.http.state import app_runtime
from service.observability.metrics import start_metrics_server
from service.settings import Settings
from testkit import free_port, load_module, wait_until

MakeCredential = Callable[..., Awaitable[Any]]  # conftest's make_credential

DEPLOY_CONFTEST = Path(__file__).resolve().parents[1] / "deploy" / "conftest.py"


@functools.cache
def deploy_kit() -> ModuleType:
    """tests/deploy/conftest.py as a plain module: the contract list, the chart renderer and
    the PromQL name extraction those tests use (loaded by path: not on sys.path here)."""
    return load_module(DEPLOY_CONFTEST, "deploy_contract_kit")


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with appkit.serving(settings) as served:
        yield served.app, served.client


def scrape_over_http(app: FastAPI) -> str:
    """What a Prometheus server gets from the single-process metrics endpoint."""
    port = free_port()
    server = start_metrics_server(port, "127.0.0.1", app_runtime(app).metrics.registry)
    try:
        response = wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5),
            timeout=5,
            what="metrics endpoint",
        )
    finally:
        server.shutdown()
        server.server_close()
    response.raise_for_status()
    return response.text


def series_values(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name (what PromQL selects) -> [(labels, value)] of a scrape."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for item in family.samples:
            found.setdefault(item.name, []).append((item.labels, item.value))
    return found


def family_types(text: str) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def value(series: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for found, v in series.get(name, []) if labels.items() <= found.items())


def chart_query_names(kit: ModuleType) -> dict[str, set[str]]:
    """Series names queried by each rendered dashboard and alert, over every value set."""
    names: dict[str, set[str]] = {}
    for set_name, values in kit.value_sets().items():
        for obj in kit.render(values):
            if obj.kind == "PrometheusRule":
                for group in obj.obj["spec"]["groups"]:
                    for rule in group["rules"]:
                        where = f"{set_name}: alert {rule.get('alert') or rule.get('record')}"
                        names[where] = kit.promql_metric_names(rule["expr"])
            elif obj.kind == "ConfigMap" and obj.name.endswith("-dashboard"):
                for key, text in obj.obj["data"].items():
                    for query in kit.dashboard_queries(json.loads(text)):
                        names[f"{set_name}: dashboard {key}: {query}"] = kit.promql_metric_names(
                            query
                        )
    return names


async def test_dashboards_and_alerts_query_series_a_real_scrape_contains(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    kit = deploy_kit()
    credential = await make_credential()
    # The rate limiter on (in-memory), with a per-owner budget of 2, so the third authenticated
    # request increments rate_limit_exceeded_total: a labelled counter has no series until then.
    # A read URL (the same database: a server that is not a standby counts as caught up) so the
    # replica's series exist; they do not without one.
    base = make_settings()
    assert base.database_url is not None
    settings = make_settings(
        rate_limit_enabled=True,
        rate_limit_default="2/minute",
        rate_limit_per_ip="1000/minute",
        database_read_url=base.database_url.get_secret_value(),
    )
    async with serving(settings) as (app, client):

        async def replica_measured() -> bool:
            body = (await client.get("/health/ready")).json()
            return bool(body["replica"]["state"] == "streaming")

        await eventually(replica_measured, what="the first replica poll")
        listed = await client.get("/v1/tasks", headers=credential.headers)
        missing = await client.get(f"/v1/tasks/{uuid.uuid4()}", headers=credential.headers)
        anonymous = await client.get("/v1/tasks")
        ready = await client.get("/health/ready")
        limited = await client.get("/v1/tasks", headers=credential.headers)
        statuses = [r.status_code for r in (listed, missing, anonymous, ready, limited)]
        assert statuses == [200, 404, 401, 200, 429], [r.text for r in (listed, limited)]
        text = scrape_over_http(app)

    series = series_values(text)
    scraped = set(series)

    # The requests are in the scrape as sent: this is the app's live registry, not a fixture.
    requests = "http_requests_total"
    assert value(series, requests, method="GET", route="/v1/tasks", status_code="200") == 1
    assert value(series, requests, route="/v1/tasks/{task_id}", status_code="404") == 1
    assert value(series, requests, route="/v1/tasks", status_code="401") == 1
    assert value(series, requests, route="/v1/tasks", status_code="429") == 1
    assert value(series, requests, route="/health/ready", status_code="200") >= 1
    assert value(series, "rate_limit_exceeded_total", scope="principal") == 1
    assert value(series, "http_request_duration_seconds_count", route="/v1/tasks") == 3
    assert value(series, "db_up") == 1
    assert value(series, "db_replica_up") == 1
    assert value(series, "db_replica_lag_seconds") == 0
    # The two reads that reached the database (the third was refused before it).
    assert value(series, "db_reads_total") == 2

    # (a) The hand-written contract of tests/deploy: every series it allows has samples here...
    contract = kit.contract_series()
    assert contract <= scraped, f"in the contract, not exported: {sorted(contract - scraped)}"
    # ... and is of the kind the list files it under (a counter's family drops "_total").
    types = family_types(text)
    for counter in kit.CONTRACT_COUNTERS:
        assert types.get(counter.removesuffix("_total")) == "counter", counter
    for gauge in kit.CONTRACT_GAUGES:
        assert types.get(gauge) == "gauge", gauge
    for histogram in kit.CONTRACT_HISTOGRAMS:
        assert types.get(histogram) == "histogram", histogram

    # (b) Every series the rendered dashboard and PrometheusRule query is exported (kube-state-
    # metrics' series aside: another exporter's, and never the service's to export; so are the
    # backup jobs' pushed series, checked against what they push in tests/deploy).
    queried = chart_query_names(kit)
    elsewhere = kit.KUBE_STATE_METRICS | kit.PUSHED_METRICS
    assert any("dashboard" in where for where in queried), "no value set renders the dashboard"
    assert any("alert" in where for where in queried), "no value set renders the PrometheusRule"
    assert not elsewhere & scraped
    unknown = {
        where: sorted(names - scraped - elsewhere)
        for where, names in queried.items()
        if names - scraped - elsewhere
    }
    assert not unknown, f"queried but not in a real scrape: {unknown}"
    assert set().union(*queried.values()) - elsewhere, "no service series queried"
