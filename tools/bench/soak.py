"""``make soak``: minutes of mixed load with forced worker recycling; slopes, errors, p99.

A benchmark, not a test: it prints figures and exits 1 when a promise is broken.

    SOAK_MINUTES=30 make soak

What runs: ``python -m service serve`` (gunicorn, SOAK_WORKERS=2 uvicorn workers, every
middleware on) on an embedded PostgreSQL 16 (or DATABASE_URL), with GUNICORN_MAX_REQUESTS set
low (SOAK_MAX_REQUESTS=5000, jitter 10 %) so every worker is recycled many times. SOAK_CLIENTS=8
client threads, each on its own keep-alive connection, loop over a mix of
create (201), read (200), list (200), a stale ``If-Match`` update (412), a read of a task that
does not exist (404) and, every 10th turn, two concurrent creates with one ``Idempotency-Key``
(201 and then 409 or a replayed 201). Clients never retry: any other outcome, a transport
error included, is an error.

Every SOAK_SAMPLE_SECONDS=5: per worker RSS and open file descriptors (/proc), the server's
connections to PostgreSQL (pg_stat_activity, the server side), each worker's event-loop lag
(``event_loop_lag_seconds`` from the metrics port). Per SOAK_WINDOW_SECONDS=60 window it prints
requests, errors, p50/p99 latency and recycles; at the end the least-squares slope per hour of
each sampled series after SOAK_WARMUP_SECONDS=120 (a fresh worker's caches fill first), fitted
to the per-window medians.

Exits 1 when errors > 0 or a slope exceeds its bound (``BOUNDS``). Worker RSS is the mean over
the live workers, so recycling shows as a saw-tooth whose trend, not level, is judged.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.tools.embedded_postgres import EmbeddedPostgres
from tools.kit import REPO as ROOT
from tools.kit import free_port, wait_until


def _env_number(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


MINUTES = _env_number("SOAK_MINUTES", 10)
WORKERS = int(_env_number("SOAK_WORKERS", 2))
CLIENTS = int(_env_number("SOAK_CLIENTS", 8))
MAX_REQUESTS = int(_env_number("SOAK_MAX_REQUESTS", 5_000))
SAMPLE_SECONDS = _env_number("SOAK_SAMPLE_SECONDS", 5)
WINDOW_SECONDS = _env_number("SOAK_WINDOW_SECONDS", 60)
WARMUP_SECONDS = _env_number("SOAK_WARMUP_SECONDS", 120)

# Largest acceptable growth per hour of each sampled series. A leak of one object per request
# at ~500 requests/s would be hundreds of MB per hour; these catch far less than that while
# staying above the noise of a recycling saw-tooth over a 30-minute run.
BOUNDS = {
    "worker_rss_mb": 25.0,
    "worker_open_fds": 10.0,
    "db_connections": 4.0,
    "loop_lag_ms": 50.0,
}


@dataclass
class Outcome:
    at: float
    op: str
    ok: bool
    latency: float
    detail: str = ""


@dataclass
class Sample:
    at: float
    workers: dict[int, tuple[float, int]]  # pid -> (RSS MB, open fds)
    db_connections: int
    loop_lag_ms: float  # worst worker

    @property
    def mean_rss(self) -> float:
        return statistics.fmean(r for r, _ in self.workers.values()) if self.workers else 0.0

    @property
    def mean_fds(self) -> float:
        return statistics.fmean(f for _, f in self.workers.values()) if self.workers else 0.0


@dataclass
class Run:
    started: float = field(default_factory=time.monotonic)
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    pids_seen: dict[int, float] = field(default_factory=dict)  # pid -> first seen
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


# --- the load ----------------------------------------------------------------------------------
def _timed(
    run: Run, op: str, expected: set[int], send: Callable[[], httpx.Response]
) -> httpx.Response | None:
    started = time.monotonic()
    try:
        response = send()
    except httpx.HTTPError as exc:
        run.record(Outcome(started, op, False, time.monotonic() - started, type(exc).__name__))
        return None
    ok = response.status_code in expected
    detail = "" if ok else str(response.status_code)
    run.record(Outcome(started, op, ok, time.monotonic() - started, detail))
    return response


def client_loop(run: Run, base_url: str, key: str, stop: threading.Event, index: int) -> None:
    headers = {"X-API-Key": key}
    with (
        httpx.Client(base_url=base_url, headers=headers, timeout=30) as http,
        ThreadPoolExecutor(2) as pair,
        httpx.Client(base_url=base_url, headers=headers, timeout=30) as other,
    ):
        turn = 0
        while not stop.is_set():
            turn += 1
            title = f"soak-{index}-{turn}"
            fresh_key = {"Idempotency-Key": str(uuid.uuid4())}
            create = partial(http.post, "/v1/tasks", json={"title": title}, headers=fresh_key)
            created = _timed(run, "create", {201}, create)
            if created is not None and created.status_code == 201:
                path = f"/v1/tasks/{created.json()['id']}"
                stale = {"If-Match": created.headers.get("etag", '"0"').replace('"', '"x', 1)}
                _timed(run, "read", {200}, partial(http.get, path))
                update = partial(http.patch, path, json={"title": f"{title}!"}, headers=stale)
                _timed(run, "update-stale", {412}, update)
            _timed(run, "list", {200}, partial(http.get, "/v1/tasks", params={"limit": 20}))
            _timed(run, "missing", {404}, partial(http.get, f"/v1/tasks/{uuid.uuid4()}"))
            if turn % 10 == 0:
                same_key = {"Idempotency-Key": str(uuid.uuid4())}
                body = {"title": f"{title}-pair"}
                futures = [
                    pair.submit(
                        _timed,
                        run,
                        "create-same-key",
                        {201, 409},
                        partial(client.post, "/v1/tasks", json=body, headers=same_key),
                    )
                    for client in (http, other)
                ]
                for future in futures:
                    future.result()


# --- sampling ----------------------------------------------------------------------------------
def _children(pid: int) -> set[int]:
    with suppress(OSError):
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    return set()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _loop_lag_ms(metrics_url: str) -> float:
    with suppress(httpx.HTTPError):
        text = httpx.get(metrics_url, timeout=5).text
        values = [
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "event_loop_lag_seconds"
        ]
        return max(values, default=0.0) * 1000
    return float("nan")


def sampler(
    run: Run, master: int, pg: EmbeddedPostgres, metrics_url: str, stop: threading.Event
) -> None:
    sql = (
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
        "AND application_name LIKE 'fastapi-app%'"
    )
    while not stop.wait(SAMPLE_SECONDS):
        workers: dict[int, tuple[float, int]] = {}
        for pid in _children(master):
            with suppress(OSError, ValueError):
                workers[pid] = (_rss_mb(pid), len(os.listdir(f"/proc/{pid}/fd")))
                run.pids_seen.setdefault(pid, time.monotonic())
        try:
            connections = int(pg.psql(sql).strip() or 0)
        except Exception:
            connections = -1
        sample = Sample(time.monotonic(), workers, connections, _loop_lag_ms(metrics_url))
        with run.lock:
            run.samples.append(sample)


# --- figures -----------------------------------------------------------------------------------
def slope_per_hour(points: list[tuple[float, float]]) -> float:
    if len(points) < 3:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return 0.0
    cov = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    return cov / var * 3600


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _window_medians(
    run: Run, samples: list[Sample], value: Callable[[Sample], float]
) -> list[tuple[float, float]]:
    """One point per window (its middle, the median sample): a recycle or a busy second on a
    shared machine moves one sample a lot, a window's median little."""
    windows: dict[int, list[float]] = {}
    for sample in samples:
        number = value(sample)
        if number == number:  # not NaN (a failed scrape)
            windows.setdefault(int((sample.at - run.started) // WINDOW_SECONDS), []).append(number)
    return [
        (run.started + (index + 0.5) * WINDOW_SECONDS, statistics.median(values))
        for index, values in sorted(windows.items())
    ]


def report(run: Run, ended: float) -> int:
    print(
        f"\n{'window':>8} {'requests':>9} {'errors':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'recycles':>8} {'RSS MB':>7} {'fds':>5} {'db conns':>8} {'lag ms':>7}"
    )
    window = 0
    while run.started + window * WINDOW_SECONDS < ended:
        lo, hi = run.started + window * WINDOW_SECONDS, run.started + (window + 1) * WINDOW_SECONDS
        calls = [o for o in run.outcomes if lo <= o.at < hi]
        samples = [s for s in run.samples if lo <= s.at < hi]
        new_pids = [p for p, t in run.pids_seen.items() if lo <= t < hi and t > run.started + 10]
        latencies = [o.latency * 1000 for o in calls]
        print(
            f"{window * WINDOW_SECONDS / 60:>6.0f}m {len(calls):>9} "
            f"{sum(not o.ok for o in calls):>7} {percentile(latencies, 0.5):>7.1f} "
            f"{percentile(latencies, 0.99):>7.1f} {len(new_pids):>8} "
            f"{statistics.fmean([s.mean_rss for s in samples]) if samples else 0:>7.1f} "
            f"{statistics.fmean([s.mean_fds for s in samples]) if samples else 0:>5.1f} "
            f"{max((s.db_connections for s in samples), default=0):>8} "
            f"{max((s.loop_lag_ms for s in samples), default=0):>7.1f}"
        )
        window += 1

    steady = [s for s in run.samples if s.at >= run.started + WARMUP_SECONDS]
    series = {
        "worker_rss_mb": _window_medians(run, steady, lambda s: s.mean_rss),
        "worker_open_fds": _window_medians(run, steady, lambda s: s.mean_fds),
        "db_connections": _window_medians(run, steady, lambda s: float(s.db_connections)),
        "loop_lag_ms": _window_medians(run, steady, lambda s: s.loop_lag_ms),
    }
    errors = [o for o in run.outcomes if not o.ok]
    by_detail: dict[str, int] = {}
    for o in errors:
        by_detail[f"{o.op}: {o.detail}"] = by_detail.get(f"{o.op}: {o.detail}", 0) + 1
    latencies = [o.latency * 1000 for o in run.outcomes]
    duration = ended - run.started
    print(
        f"\n{len(run.outcomes)} requests in {duration / 60:.1f} min "
        f"({len(run.outcomes) / duration:.0f}/s), {len(errors)} errors {by_detail or ''}; "
        f"p50 {percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms; "
        f"{len(run.pids_seen)} worker processes for {WORKERS} slots "
        f"({max(len(run.pids_seen) - WORKERS, 0)} recycles)"
    )
    failed = bool(errors)
    print(f"slopes after {WARMUP_SECONDS:.0f} s warm-up, per hour (bound):")
    for name, points in series.items():
        slope = slope_per_hour(points)
        verdict = "ok" if slope <= BOUNDS[name] else "EXCEEDED"
        failed |= slope > BOUNDS[name]
        print(f"  {name:<16} {slope:+9.2f}/h  (<= {BOUNDS[name]:g})  {verdict}")
    if duration < WARMUP_SECONDS + 10 * SAMPLE_SECONDS:
        print("  (too short for slopes to mean much: run SOAK_MINUTES >= 10)")
    print("soak: FAILED" if failed else "soak: passed")
    return 1 if failed else 0


# --- the server --------------------------------------------------------------------------------
@contextmanager
def database(work: Path) -> Iterator[tuple[str, EmbeddedPostgres]]:
    pg = EmbeddedPostgres(work / "postgres").start()
    try:
        yield pg.url, pg
    finally:
        pg.stop(mode="immediate")


def service_env(database_url: str, port: int, metrics_port: int, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_"))}
    env.update(
        {
            "ENVIRONMENT": "staging",
            "DATABASE_URL": database_url,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "METRICS_PORT": str(metrics_port),
            "PROMETHEUS_MULTIPROC_DIR": str(work / "metrics"),
            "WEB_CONCURRENCY": str(WORKERS),
            "GUNICORN_MAX_REQUESTS": str(MAX_REQUESTS),
            "GUNICORN_MAX_REQUESTS_JITTER": str(MAX_REQUESTS // 10),
            "GATEWAY_REQUIRED": "false",
            "RATE_LIMIT_ENABLED": "false",
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="fastapi-app-soak-"))
    print(
        f"soak: {MINUTES:g} min, {WORKERS} workers, {CLIENTS} clients, max_requests "
        f"{MAX_REQUESTS} (+10 % jitter), samples every {SAMPLE_SECONDS:g} s",
        flush=True,
    )
    try:
        with database(work) as (url, pg):
            env = service_env(url, free_port(), free_port(), work)
            subprocess.run(
                [sys.executable, "-m", "service", "migrate"], env=env, cwd=ROOT, check=True,
                capture_output=True,
            )  # fmt: skip
            key = subprocess.run(
                [sys.executable, "-m", "service", "create-api-key", "--owner", "soak"],
                env=env, cwd=ROOT, check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1]  # fmt: skip
            log = (work / "server.log").open("wb")
            server = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            base_url = f"http://127.0.0.1:{env['PORT']}"
            try:
                wait_until(
                    lambda: httpx.get(f"{base_url}/health/ready", timeout=2).status_code == 200,
                    timeout=60,
                    what="the server",
                )
                run = Run()
                stop = threading.Event()
                metrics_url = f"http://127.0.0.1:{env['METRICS_PORT']}/metrics"
                threads = [
                    threading.Thread(target=sampler, args=(run, server.pid, pg, metrics_url, stop))
                ] + [
                    threading.Thread(target=client_loop, args=(run, base_url, key, stop, i))
                    for i in range(CLIENTS)
                ]
                for thread in threads:
                    thread.start()
                deadline = run.started + MINUTES * 60
                while time.monotonic() < deadline and server.poll() is None:
                    time.sleep(min(WINDOW_SECONDS, max(deadline - time.monotonic(), 0.1)))
                    done = len(run.outcomes)
                    minute = (time.monotonic() - run.started) / 60
                    print(f"  {minute:5.1f} min: {done} requests", flush=True)
                stop.set()
                for thread in threads:
                    thread.join(60)
                ended = time.monotonic()
                if server.poll() is not None:
                    print(f"soak: the server exited ({server.returncode})")
                    return 1
            finally:
                with suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()
                log.close()
            return report(run, ended)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    random.seed()
    sys.exit(main())
