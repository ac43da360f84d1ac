"""``make bench``: load-test the service and its two ceilings; print a table (not a test).

Everything runs on 127.0.0.1 and stops by itself: wrk (BENCH_CONNECTIONS=64 connections,
BENCH_SECONDS=10 each after a discarded BENCH_WARMUP_SECONDS=2 warm-up; BENCH_WORKERS=2) against

- the service served by ``python -m service serve`` (gunicorn + uvicorn workers, every
  middleware on), direct;
- the same through Nginx + PgBouncer (the ``make stack`` launcher), when nginx and pgbouncer are
  installed;
- ceiling 1: a bare ASGI app returning a constant JSON body;
- ceiling 2: a bare ASGI app doing the same primary-key SELECT with a raw asyncpg pool;
- reads with a streaming replica (``pg_basebackup -R`` of the bench's PostgreSQL): GET by id
  with ``DATABASE_READ_URL`` set, against a control run without it, counting the transactions
  the primary ran in each (from ``pg_stat_database``, read after the app has exited and its
  backends have flushed their statistics) and where the app sent each read (``db_reads_total``);

all with the same worker count on the same PostgreSQL. Also printed: RSS per worker and the
time from process start to ready.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "bench"))

from wrk import WrkResult, run  # noqa: E402

from service.embedded_postgres import EmbeddedPostgres  # noqa: E402
from service.migrate import upgrade  # noqa: E402
from testkit import free_port, wait_until  # noqa: E402

WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
WARMUP_SECONDS = int(os.environ.get("BENCH_WARMUP_SECONDS", "2"))
SEED_TASKS = 2_000


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    ready_seconds: float

    def worker_rss_mb(self) -> list[float]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        pids = children.read_text().split() if children.exists() else []
        sizes = []
        for pid in pids:
            with suppress(FileNotFoundError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        sizes.append(int(line.split()[1]) / 1024)
        return sizes


@contextmanager
def serve(command: list[str], env: dict[str, str], ready_path: str, port: int) -> Iterator[Server]:
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def ready() -> bool:
            return httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=1).status_code == 200

        wait_until(ready, timeout=60, interval=0.02, what=" ".join(command[:3]))
        yield Server(process, port, time.monotonic() - started)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def base_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "GATEWAY_", "REDIS_"))
    }
    env.update(
        {
            "ENVIRONMENT": "staging",
            "DATABASE_URL": database_url,
            "WEB_CONCURRENCY": str(WORKERS),
            # INFO: the access line per request is part of what a request costs in production.
            "LOG_LEVEL": "INFO",
            "GATEWAY_REQUIRED": "false",
            "RATE_LIMIT_ENABLED": "false",
            # One pooled connection per client connection (64 over 2 workers), as the raw
            # ceiling's asyncpg pool gets: nobody waits for a connection, nothing churns.
            "SQLALCHEMY_POOL_SIZE": str(max(CONNECTIONS // WORKERS, 1)),
            "SQLALCHEMY_POOL_OVERFLOW": "0",
        }
    )
    env.update(extra)
    return env


def create_key(env: dict[str, str], owner: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "service", "create-api-key", "--owner", owner],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1]


def seed(base_url: str, key: str) -> list[str]:
    ids: list[str] = []
    with httpx.Client(base_url=base_url, headers={"X-API-Key": key}, timeout=10) as client:
        for index in range(SEED_TASKS):
            response = client.post("/v1/tasks", json={"title": f"seed {index}", "tags": ["seed"]})
            response.raise_for_status()
            ids.append(response.json()["id"])
    return ids


def load(url: str, key: str | None = None, *, post: bool = False) -> WrkResult:
    headers = {"X-API-Key": key} if key else {}
    if WARMUP_SECONDS:
        # Discarded: pools open their connections lazily, caches fill, the first requests of a
        # worker pay for its imports. The figures are for a service that has been up a while.
        run(url, connections=CONNECTIONS, duration_s=WARMUP_SECONDS, headers=headers, post=post)
    return run(url, connections=CONNECTIONS, duration_s=SECONDS, headers=headers, post=post)


def row(name: str, result: WrkResult, ceiling: WrkResult | None) -> str:
    ratio = (
        f"{result.requests_per_second / ceiling.requests_per_second:6.0%}" if ceiling else "     -"
    )
    return (
        f"{name:<44} {result.requests_per_second:>9.0f} {result.p50_ms:>8.2f} "
        f"{result.p99_ms:>8.2f} {ratio:>8} {result.errors:>7}"
    )


def main() -> int:
    if not shutil.which("wrk") and not Path("/usr/bin/wrk").exists():
        print("make bench needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fastapi-app-bench-"))
    pg = EmbeddedPostgres(work / "postgres").start()
    try:
        asyncio.run(upgrade(pg.url))
        owner = str(uuid.uuid4())
        port = free_port()
        env = base_env(
            pg.url,
            PORT=str(port),
            METRICS_PORT=str(free_port()),
            PROMETHEUS_MULTIPROC_DIR=str(work / "metrics"),
        )
        key = create_key(env, owner)
        results: list[str] = []
        with serve([sys.executable, "-m", "service", "serve"], env, "/health/ready", port) as app:
            base = f"http://127.0.0.1:{port}"
            task_ids = seed(base, key)
            task_url = f"{base}/v1/tasks/{task_ids[len(task_ids) // 2]}"
            get_one = load(task_url, key)
            get_list = load(f"{base}/v1/tasks?limit=20", key)
            post = load(f"{base}/v1/tasks", key, post=True)
            rss = app.worker_rss_mb()
            ready_seconds = app.ready_seconds

        ceiling_env = {**env, "BENCH_DSN": pg.libpq_url, "BENCH_OWNER_ID": owner}
        gunicorn = [
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            "uvicorn_worker.UvicornWorker",
            "-w",
            str(WORKERS),
            "-b",
            f"127.0.0.1:{port}",
        ]
        with serve([*gunicorn, "tests.bench.ceilings:constant_app"], ceiling_env, "/", port):
            constant = load(f"http://127.0.0.1:{port}/")
        with serve(
            [*gunicorn, "tests.bench.ceilings:raw_asyncpg_app()"],
            ceiling_env,
            f"/v1/tasks/{task_ids[0]}",
            port,
        ):
            raw = load(f"http://127.0.0.1:{port}/v1/tasks/{task_ids[len(task_ids) // 2]}")

        replica_runs = run_with_replica(pg, work, key, task_url.rsplit("/", 1)[-1])
        through = run_through_stack(work)

        header = (
            f"{'scenario':<44} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>8} {'errors':>7}"
        )
        print(f"\nfastapi-app bench: {WORKERS} workers, {CONNECTIONS} connections, {SECONDS}s each")
        print("(ratio: reads to the raw-asyncpg ceiling; Nginx+PgBouncer rows to direct)\n")
        print(header)
        print("-" * len(header))
        results.append(row("ceiling: constant JSON (bare ASGI)", constant, None))
        results.append(row("ceiling: raw asyncpg SELECT by id", raw, constant))
        results.append(row("GET /v1/tasks/{id}  direct", get_one, raw))
        results.append(row("GET /v1/tasks?limit=20  direct", get_list, raw))
        results.append(row("POST /v1/tasks  direct", post, None))
        for name, run_result in replica_runs:
            results.append(row(name, run_result.result, get_one))
        for name, result, direct in through:
            baseline = {"get_one": get_one, "get_list": get_list, "post": post}[direct]
            results.append(row(name, result, baseline))
        print("\n".join(results))
        if (
            any(result.errors for result in (constant, raw, get_one, get_list, post))
            or any(result.errors for _, result, _ in through)
            or any(run.result.errors for _, run in replica_runs)
        ):
            print("\nWARNING: a row counted errors (non-2xx or socket errors): its figures are")
            print("not a measurement of the service working; look into it before quoting them.")
        for name, run_result in replica_runs:
            print(f"\n{name}: {run_result.describe()}")
        if len(replica_runs) == 2:
            control, replica = (r for _, r in replica_runs)
            spared = 1 - replica.primary_per_request / max(control.primary_per_request, 1e-9)
            print(
                f"the primary was spared {spared:.0%} of its transactions per read "
                f"({control.primary_per_request:.3f} -> {replica.primary_per_request:.3f})"
            )
        print(f"\nRSS per worker (MB): {', '.join(f'{mb:.0f}' for mb in rss)}")
        print(f"start to ready: {ready_seconds:.2f} s")
    finally:
        pg.stop(mode="immediate")
        shutil.rmtree(work, ignore_errors=True)
    return 0


@dataclass
class ReplicaRun:
    result: WrkResult
    primary_transactions: int  # run by the primary while this app was up (incl. warm-up)
    reads: dict[str, float]  # db_reads_total by target
    requests: float  # served by the app, warm-up included (http_requests_total)

    @property
    def primary_per_request(self) -> float:
        return self.primary_transactions / max(self.requests, 1)

    def describe(self) -> str:
        where = ", ".join(f"{target} {count:.0f}" for target, count in sorted(self.reads.items()))
        return (
            f"{self.primary_transactions} primary transactions for {self.requests:.0f} reads "
            f"({self.primary_per_request:.3f} per read); reads by target: {where or 'n/a'}"
        )


def _primary_transactions(pg: EmbeddedPostgres) -> int:
    sql = (
        f"SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{pg.database}'"
    )
    return int(pg.psql(sql))


def _settled_transactions(pg: EmbeddedPostgres) -> int:
    """The count once the app's backends have exited and flushed their statistics."""
    seen: list[int] = []

    def stable() -> bool:
        seen.append(_primary_transactions(pg))
        return len(seen) >= 3 and seen[-1] == seen[-3]

    wait_until(stable, timeout=30, interval=0.5, what="pg_stat_database settles")
    return seen[-1]


def _reads_by_target(metrics_port: int) -> tuple[dict[str, float], float]:
    """db_reads_total by target, and the GET-by-id requests answered."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    reads: dict[str, float] = {}
    requests = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "db_reads_total":
                target = sample.labels["target"]
                reads[target] = reads.get(target, 0) + sample.value
            elif (
                sample.name == "http_requests_total"
                and sample.labels.get("route") == "/v1/tasks/{task_id}"
            ):
                requests += sample.value
    return reads, requests


def run_with_replica(
    pg: EmbeddedPostgres, work: Path, key: str, task_id: str
) -> list[tuple[str, ReplicaRun]]:
    """GET by id without and with a streaming replica; what the primary ran for each."""
    replica = pg.create_replica(work / "replica", slot="bench_replica")
    replica.start()
    try:
        target = pg.psql("SELECT pg_current_wal_flush_lsn()")
        wait_until(
            lambda: replica.psql(f"SELECT pg_last_wal_replay_lsn() >= '{target}'") == "t",
            timeout=60,
            what="replica caught up",
        )
        runs = []
        for name, read_url in (
            ("GET /v1/tasks/{id}  direct, control", None),
            ("GET /v1/tasks/{id}  reads on the replica", replica.url),
        ):
            port, metrics_port = free_port(), free_port()
            extra = {"DATABASE_READ_URL": read_url} if read_url else {}
            env = base_env(
                pg.url,
                PORT=str(port),
                METRICS_PORT=str(metrics_port),
                PROMETHEUS_MULTIPROC_DIR=str(work / f"metrics-{len(runs)}"),
                **extra,
            )
            before = _settled_transactions(pg)
            with serve([sys.executable, "-m", "service", "serve"], env, "/health/ready", port):
                base = f"http://127.0.0.1:{port}"
                if read_url:
                    wait_until(
                        lambda base=base: (
                            httpx.get(f"{base}/health/ready", timeout=1).json()["replica"]["state"]
                            == "streaming"
                        ),
                        timeout=30,
                        what="replica streaming",
                    )
                result = load(f"{base}/v1/tasks/{task_id}", key)
                reads, requests = _reads_by_target(metrics_port)
            after = _settled_transactions(pg)
            runs.append((name, ReplicaRun(result, after - before, reads, requests)))
        return runs
    finally:
        replica.stop(mode="immediate")


def run_through_stack(work: Path) -> list[tuple[str, WrkResult, str]]:
    """The same three requests through Nginx -> gunicorn -> PgBouncer (needs the binaries)."""
    try:
        from stack.launcher import Stack  # type: ignore[import-not-found]
    except ImportError:
        print("(no stack launcher: skipping the Nginx + PgBouncer rows)")
        return []
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        print("(nginx not installed: skipping the Nginx + PgBouncer rows)")
        return []
    # The same app settings as the direct rows (rate limits off, same pool), and an Nginx
    # limit_req the load never reaches: this measures the proxies, not the limiters.
    app_env = {
        key: value
        for key, value in base_env("").items()
        if key in {"ENVIRONMENT", "LOG_LEVEL", "RATE_LIMIT_ENABLED", "GATEWAY_REQUIRED"}
        or key.startswith("SQLALCHEMY_")
    }
    nginx_env = {"LIMIT_REQ_RATE": "1000000r/s", "LIMIT_REQ_BURST": "1000000"}
    with Stack(
        work / "stack",
        app_instances=1,
        workers=WORKERS,
        redis=False,
        app_env=app_env,
        nginx_env=nginx_env,
    ) as stack:
        key, base = stack.api_key, stack.url
        ids = seed(base, key)
        return [
            (
                "GET /v1/tasks/{id}  nginx+pgbouncer",
                load(f"{base}/v1/tasks/{ids[0]}", key),
                "get_one",
            ),
            (
                "GET /v1/tasks?limit=20  nginx+pgbouncer",
                load(f"{base}/v1/tasks?limit=20", key),
                "get_list",
            ),
            ("POST /v1/tasks  nginx+pgbouncer", load(f"{base}/v1/tasks", key, post=True), "post"),
        ]


if __name__ == "__main__":
    sys.exit(main())
