"""Prometheus metrics: names fixed by the deployment contract (dashboards and alerts use them).

Single process (``make run``): the app's own registry is served by
``start_metrics_server``. Under gunicorn, prometheus-client's multiprocess mode is on
(``PROMETHEUS_MULTIPROC_DIR`` is set before anything imports prometheus_client): every worker
writes its values to memory-mapped files in that directory and the gunicorn master serves the
aggregate on METRICS_PORT (see ``service/entrypoints/gunicorn_conf.py``). The API port never
serves metrics.

The metric objects belong to a ``Metrics`` instance built by the app factory, registered in a
registry of its own rather than prometheus-client's global one, so tests can build many apps in
one process. In multiprocess mode the registry is irrelevant (values go to the per-pid files,
keyed by metric name and labels): one app per worker process, which is what gunicorn runs.

Labels are bounded by construction: ``route`` is the route template (``/v1/tasks/{task_id}``) or
``<unmatched>``, ``method`` one of the standard methods or ``OTHER``, ``status_code`` whatever the
app answers.
"""

from __future__ import annotations

import os
import time
from typing import Any

import prometheus_client.values
from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    multiprocess,
    start_http_server,
)
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from service.replica import ReplicaState, ReplicaStatus
from service.settings import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED_ROUTE = "<unmatched>"
OTHER_METHOD = "OTHER"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# An API answers in milliseconds; the tail up to the 10 s budget of the slowest proxy matters.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
DB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_QUERY_STARTED = "_fastapi_app_query_started"


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class _ForkAwarePid:
    """The process id, asked of the kernel once per process instead of once per metric update.

    In multiprocess mode prometheus-client checks ``os.getpid()`` on every increment, so that a
    value updated after a fork goes to the child's file; that is a system call, about ten per
    request here (5 % of a worker's CPU in the profile). The id only changes at a fork, and
    ``os.register_at_fork`` tells us when.
    """

    def __init__(self) -> None:
        self.value = os.getpid()
        os.register_at_fork(after_in_child=self.refresh)

    def refresh(self) -> None:
        self.value = os.getpid()

    def __call__(self) -> int:
        return self.value


def use_fork_aware_pid() -> None:
    """Make prometheus-client's multiprocess values use ``_ForkAwarePid``.

    Call it right after ``PROMETHEUS_MULTIPROC_DIR`` is set and before any metric exists (the
    gunicorn config does): values made by the previous class would write the same per-pid files
    through a second, unsynchronised mapping.
    """
    prometheus_client.values.ValueClass = prometheus_client.values.MultiProcessValue(  # type: ignore[no-untyped-call]
        process_identifier=_ForkAwarePid()
    )


def normalise_method(method: str) -> str:
    return method if method in KNOWN_METHODS else OTHER_METHOD


def multiprocess_registry() -> CollectorRegistry:
    """What the gunicorn master serves: all workers' values summed, plus its own process_*."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    ProcessCollector(registry=registry)
    return registry


def start_metrics_server(port: int, host: str, registry: CollectorRegistry) -> Any:
    """Serve ``registry`` on ``host:port`` from a daemon thread; returns the server."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


class Metrics:
    """Every metric the service exports, and the hooks that feed them."""

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        if not multiprocess_enabled():
            # prometheus-client's defaults, as a plain `start_http_server()` would export them.
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            self.registry.register(GC_COLLECTOR)
        registry = self.registry
        self.http_requests = Counter(
            "http_requests_total",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status_code"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "http_request_duration_seconds",
            "Time from receiving a request to sending the end of its response.",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        self.http_in_progress = Gauge(
            "http_requests_in_progress",
            "Requests being served right now.",
            ["method"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.db_pool_size = Gauge(
            "db_pool_size",
            "Configured size of the primary connection pool (summed over workers).",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.db_pool_checked_out = Gauge(
            "db_pool_checked_out",
            "Primary pool connections in use.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.db_pool_overflow = Gauge(
            "db_pool_overflow",
            "Primary pool connections in use beyond SQLALCHEMY_POOL_SIZE.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.db_query_duration = Histogram(
            "db_query_duration_seconds",
            "Time the database took to execute a statement.",
            buckets=DB_BUCKETS,
            registry=registry,
        )
        self.db_connect_retries = Counter(
            "db_connect_retries_total",
            "Retried attempts to obtain a database connection.",
            registry=registry,
        )
        self.db_up = Gauge(
            "db_up",
            "1 when the last readiness check reached the database, else 0.",
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        # Only with a replica: a gauge always has a sample, and db_replica_up 0 would say
        # "down" about a replica that does not exist.
        self.db_replica_lag: Gauge | None = None
        self.db_replica_up: Gauge | None = None
        if settings.database_read_url is not None:
            self.db_replica_lag = Gauge(
                "db_replica_lag_seconds",
                "Replay lag of the read replica: age of the oldest primary WAL position it has "
                "not replayed (0 when caught up). Measured by a background poll.",
                multiprocess_mode="livemax",
                registry=registry,
            )
            self.db_replica_up = Gauge(
                "db_replica_up",
                "1 when the read replica answered the last poll, else 0.",
                multiprocess_mode="livemin",
                registry=registry,
            )
        self.db_reads = Counter(
            "db_reads_total",
            "Reads by where they ran (target: replica or primary) and why (reason).",
            ["target", "reason"],
            registry=registry,
        )
        self.rate_limit_exceeded = Counter(
            "rate_limit_exceeded_total",
            "Requests refused with 429, by limit scope.",
            ["scope"],
            registry=registry,
        )
        self.rate_limit_backend_errors = Counter(
            "rate_limit_backend_errors_total",
            "Rate-limit storage failures (the limiter failed open).",
            registry=registry,
        )
        self.event_loop_lag = Gauge(
            "event_loop_lag_seconds",
            "How late this worker's event loop ran a callback that was due (sampled every "
            "0.5 s), per worker process.",
            multiprocess_mode="liveall",
            registry=registry,
        )
        self.app_info = Gauge(
            "app_info",
            "Always 1; the labels say what is running.",
            ["version", "environment"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.app_info.labels(settings.version, settings.environment.value).set(1)
        self.loop_lag_observed = self.event_loop_lag.set
        # Label children are cached: .labels() takes a lock and hashes on every call.
        self._in_progress: dict[str, Any] = {}
        self._requests: dict[tuple[str, str, str], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}
        self._reads: dict[tuple[str, str], Any] = {}

    # --- HTTP ---------------------------------------------------------------------------------
    def request_started(self, method: str) -> None:
        child = self._in_progress.get(method)
        if child is None:
            child = self._in_progress[method] = self.http_in_progress.labels(method)
        child.inc()

    def request_finished(self, method: str, route: str, status: int, seconds: float) -> None:
        self._in_progress[method].dec()
        key = (method, route, str(status))
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.http_requests.labels(*key)
        counter.inc()
        histogram = self._durations.get((method, route))
        if histogram is None:
            histogram = self._durations[(method, route)] = self.http_duration.labels(method, route)
        histogram.observe(seconds)

    # --- database -----------------------------------------------------------------------------
    def connect_retried(self) -> None:
        self.db_connect_retries.inc()

    def set_db_up(self, up: bool) -> None:
        self.db_up.set(1 if up else 0)

    def replica_status(self, status: ReplicaStatus) -> None:
        if self.db_replica_up is None or self.db_replica_lag is None:
            return
        self.db_replica_up.set(0 if status.state is ReplicaState.UNAVAILABLE else 1)
        if status.lag_seconds is not None:
            self.db_replica_lag.set(status.lag_seconds)

    def read_routed(self, target: str, reason: str) -> None:
        counter = self._reads.get((target, reason))
        if counter is None:
            counter = self._reads[(target, reason)] = self.db_reads.labels(target, reason)
        counter.inc()

    def instrument_engine(self, engine: AsyncEngine, *, pool_gauges: bool) -> None:
        """Time statements on ``engine``; with ``pool_gauges``, track its pool.

        Pool gauges are updated from checkout/checkin events: no polling, no work when idle.
        """
        sync_engine = engine.sync_engine

        def before_execute(*args: Any) -> None:
            context = args[4]
            if context is not None:
                setattr(context, _QUERY_STARTED, time.perf_counter())

        def after_execute(*args: Any) -> None:
            started = getattr(args[4], _QUERY_STARTED, None)
            if started is not None:
                self.db_query_duration.observe(time.perf_counter() - started)

        event.listen(sync_engine, "before_cursor_execute", before_execute)
        event.listen(sync_engine, "after_cursor_execute", after_execute)
        if not pool_gauges:
            return
        pool: Any = sync_engine.pool
        size = int(pool.size())
        self.db_pool_size.set(size)

        def publish(checked_out: int) -> None:
            checked_out = max(checked_out, 0)
            self.db_pool_checked_out.set(checked_out)
            self.db_pool_overflow.set(max(checked_out - size, 0))

        def on_checkout(*_: Any) -> None:
            publish(sync_engine.pool.checkedout())  # type: ignore[attr-defined]

        def on_checkin(*_: Any) -> None:
            # The checkin event fires before the connection is back in the pool.
            publish(sync_engine.pool.checkedout() - 1)  # type: ignore[attr-defined]

        event.listen(sync_engine, "checkout", on_checkout)
        event.listen(sync_engine, "checkin", on_checkin)

    # --- rate limiting (callbacks for the limiter) --------------------------------------------
    def rate_limited(self, scope: str) -> None:
        self.rate_limit_exceeded.labels(scope).inc()

    def rate_limit_backend_failed(self) -> None:
        self.rate_limit_backend_errors.inc()
