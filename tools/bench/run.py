"""``make bench``: the service against its ceilings, side by side, in one run (not a test).

Systems, all up at once on 127.0.0.1 with the same worker count and the same PostgreSQL:

- ``service``: ``python -m service serve`` (gunicorn + uvicorn workers, every middleware on,
  API key, access line at INFO, metrics), direct;
- ``fastapi``: the same-framework ceiling, a plain FastAPI app with an asyncpg pool and a
  pydantic response model doing the same statement (``ceilings.fastapi_asyncpg_app``);
- ``asgi``: bare-ASGI ceilings, a constant JSON body and the same SELECT on a raw asyncpg pool;
- ``stack``: the service through Nginx + PgBouncer (``make stack``'s launcher), when both are
  installed.

Each row is one (system, request, connections). Rounds alternate between systems (the order is
reversed every other round, so drift on a shared machine hits both sides alike); each row's
figure is the median of its rounds, and every round's figures are printed too. Per row: req/s,
p50, p99, errors, and the CPU time per request of the server's processes (gunicorn master and
workers; Nginx and PgBouncer too for the stack) and of PostgreSQL, read from /proc. CPU per
request is the figure that counts: requests/s depends on what else the machine is doing, CPU
time per request much less. "other CPU" is what the rest of the machine spent during a row, as a
share of all cores: the noise.

Knobs (environment): BENCH_WORKERS=2, BENCH_CONNECTIONS=64, BENCH_LOW_CONNECTIONS=8,
BENCH_SECONDS=8, BENCH_WARMUP_SECONDS=2, BENCH_ROUNDS=3. Everything stops by itself.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx

from service.migrate import upgrade
from service.tools.embedded_postgres import EmbeddedPostgres
from tools.bench.procstat import (
    TreeSample,
    machine_busy_seconds,
    machine_description,
    rss_mb,
    tree,
)
from tools.bench.wrk import WrkResult, run
from tools.kit import REPO as ROOT
from tools.kit import find_binary, free_port, wait_until
from tools.stack import Stack

WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
LOW_CONNECTIONS = int(os.environ.get("BENCH_LOW_CONNECTIONS", "8"))
WARMUP_SECONDS = int(os.environ.get("BENCH_WARMUP_SECONDS", "2"))
ROUNDS = max(1, int(os.environ.get("BENCH_ROUNDS", "3")))
SEED_TASKS = 2_000
POSTGRES: EmbeddedPostgres | None = None  # the bench's own, once started
CPUS = len(os.sched_getaffinity(0))


# --- systems under test ------------------------------------------------------------------------
@dataclass
class System:
    """A running server: where to send requests and which process trees are its CPU."""

    name: str
    base_url: str
    server_roots: Callable[[], list[int]]
    db_roots: Callable[[], list[int]]
    headers: dict[str, str] = field(default_factory=dict)
    task_id: str = ""
    ready_seconds: float = 0.0
    worker_pids: Callable[[], list[int]] = list


@contextmanager
def serve(
    command: list[str], env: dict[str, str], ready_path: str, port: int
) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
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
            if process.poll() is not None:
                raise SystemExit(f"{' '.join(command)} exited with {process.returncode}")
            return httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=1).status_code == 200

        wait_until(ready, timeout=60, interval=0.02, what=" ".join(command[:3]))
        yield process, time.monotonic() - started
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
            # One pooled connection per client connection (64 over 2 workers), as the ceilings'
            # asyncpg pools get: nobody waits for a connection, nothing churns.
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


def migrated_postgres(work: Path) -> EmbeddedPostgres:
    """An embedded PostgreSQL in ``work``, at the schema's head. The caller stops it."""
    pg = EmbeddedPostgres(work / "postgres").start()
    try:
        asyncio.run(upgrade(pg.url))
    except BaseException:
        pg.stop(mode="immediate")
        raise
    return pg


def service_env(database_url: str, metrics_dir: Path, **extra: str) -> tuple[dict[str, str], int]:
    """The environment of a ``python -m service serve`` on free ports, and its API port (the
    metrics port is ``env["METRICS_PORT"]``)."""
    port = free_port()
    env = base_env(
        database_url,
        PORT=str(port),
        METRICS_PORT=str(free_port()),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        **extra,
    )
    return env, port


def single_worker_env(pg: EmbeddedPostgres, work: Path, **extra: str) -> tuple[dict[str, str], int]:
    """The environment of ``python -m service serve`` with one worker, and its API port."""
    return service_env(pg.url, work / "metrics", WEB_CONCURRENCY="1", **extra)


def _only(pid: int) -> list[int]:
    return [pid]


def _children(pid: int) -> list[int]:
    return sorted(tree(pid) - {pid})


def _replica_streaming(base: str) -> bool:
    ready = httpx.get(f"{base}/health/ready", timeout=1).json()
    return bool(ready["replica"]["state"] == "streaming")


def postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def gunicorn_command(app: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "-k",
        "uvicorn_worker.UvicornWorker",
        "-w",
        str(WORKERS),
        "-b",
        f"127.0.0.1:{port}",
        app,
    ]


# --- measuring ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    label: str
    system: str
    op: str  # get | list | post | constant
    connections: int


@dataclass(frozen=True)
class Measurement:
    wrk: WrkResult
    server_us: float  # server processes' CPU per request
    db_us: float  # PostgreSQL's CPU per request
    other_pct: float  # the rest of the machine, % of all cores

    @property
    def rps(self) -> float:
        return self.wrk.requests_per_second


def url_for(system: System, op: str) -> str:
    if op == "get":
        return f"{system.base_url}/v1/tasks/{system.task_id}"
    if op == "list":
        return f"{system.base_url}/v1/tasks?limit=20"
    if op == "post":
        return f"{system.base_url}/v1/tasks"
    return f"{system.base_url}/"


def measure(system: System, row: Row, seconds: int) -> Measurement:
    url = url_for(system, row.op)
    post = row.op == "post"
    # The service's POST carries an Idempotency-Key, as a careful client sends it.
    idempotency = post and system.name in {"service", "stack"}
    server_before = TreeSample.take(system.server_roots())
    db_before = TreeSample.take(system.db_roots())
    busy_before, wall_before = machine_busy_seconds(), time.monotonic()
    result = run(
        url,
        connections=row.connections,
        duration_s=seconds,
        headers=system.headers,
        post=post,
        idempotency=idempotency,
    )
    busy, wall = machine_busy_seconds() - busy_before, time.monotonic() - wall_before
    server = TreeSample.take(system.server_roots()).seconds_since(server_before)
    db = TreeSample.take(system.db_roots()).seconds_since(db_before)
    requests = max(result.requests, 1)
    other = max(busy - server - db - result.client_cpu_seconds, 0.0)
    return Measurement(
        result,
        server_us=server / requests * 1e6,
        db_us=db / requests * 1e6,
        other_pct=other / (wall * CPUS) * 100 if wall else 0.0,
    )


def median_of(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Figures:
    rps: float
    p50: float
    p99: float
    errors: int
    server_us: float
    db_us: float
    other_pct: float

    @classmethod
    def median(cls, runs: list[Measurement]) -> Figures:
        return cls(
            rps=median_of([m.rps for m in runs]),
            p50=median_of([m.wrk.p50_ms for m in runs]),
            p99=median_of([m.wrk.p99_ms for m in runs]),
            errors=sum(m.wrk.errors for m in runs),
            server_us=median_of([m.server_us for m in runs]),
            db_us=median_of([m.db_us for m in runs]),
            other_pct=median_of([m.other_pct for m in runs]),
        )


def plan(has_stack: bool) -> list[Row]:
    high, low = CONNECTIONS, LOW_CONNECTIONS
    rows = [
        Row("asgi: constant JSON", "asgi-constant", "constant", high),
        Row("asgi: raw asyncpg SELECT by id", "asgi-asyncpg", "get", high),
    ]
    for op, label in (("get", "GET /v1/tasks/{id}"), ("list", "GET /v1/tasks?limit=20")):
        rows += [Row(f"fastapi: {label}", "fastapi", op, high)]
        rows += [Row(f"service: {label}", "service", op, high)]
        if has_stack:
            rows += [Row(f"stack:   {label}", "stack", op, high)]
    rows += [Row("fastapi: POST /v1/tasks", "fastapi", "post", high)]
    rows += [Row("service: POST /v1/tasks (Idempotency-Key)", "service", "post", high)]
    if has_stack:
        rows += [Row("stack:   POST /v1/tasks (Idempotency-Key)", "stack", "post", high)]
    for op, label in (("get", "GET by id"), ("list", "list of 20"), ("post", "POST")):
        rows += [Row(f"fastapi: {label}", "fastapi", op, low)]
        rows += [Row(f"service: {label}", "service", op, low)]
    return rows


# --- the run -----------------------------------------------------------------------------------
def start_systems(stack: ExitStack, work: Path) -> tuple[dict[str, System], ExitStack]:
    """Every system, and the stack that stops its servers (PostgreSQL stays up on ``stack``)."""
    global POSTGRES
    pg = POSTGRES = EmbeddedPostgres(work / "postgres").start()
    stack.callback(pg.stop, mode="immediate")
    servers = stack.enter_context(ExitStack())
    stack = servers
    asyncio.run(upgrade(pg.url))
    pg_roots = lambda: [postmaster_pid(pg.pgdata)]  # noqa: E731
    owner = str(uuid.uuid4())
    systems: dict[str, System] = {}

    env, port = service_env(pg.url, work / "metrics")
    key = create_key(env, owner)
    process, ready = stack.enter_context(
        serve([sys.executable, "-m", "service", "serve"], env, "/health/ready", port)
    )
    service = System(
        "service",
        f"http://127.0.0.1:{port}",
        server_roots=partial(_only, process.pid),
        db_roots=pg_roots,
        headers={"X-API-Key": key},
        ready_seconds=ready,
        worker_pids=partial(_children, process.pid),
    )
    ids = seed(service.base_url, key)
    service.task_id = ids[len(ids) // 2]
    systems["service"] = service

    ceiling_env = {**env, "BENCH_DSN": pg.libpq_url, "BENCH_OWNER_ID": owner}
    for name, app, ready_path in (
        ("fastapi", "tools.bench.ceilings:fastapi_asyncpg_app()", f"/v1/tasks/{ids[0]}"),
        ("asgi-constant", "tools.bench.ceilings:constant_app", "/"),
        ("asgi-asyncpg", "tools.bench.ceilings:raw_asyncpg_app()", f"/v1/tasks/{ids[0]}"),
    ):
        port = free_port()
        process, ready = stack.enter_context(
            serve(gunicorn_command(app, port), ceiling_env, ready_path, port)
        )
        systems[name] = System(
            name,
            f"http://127.0.0.1:{port}",
            server_roots=partial(_only, process.pid),
            db_roots=pg_roots,
            task_id=service.task_id,
            ready_seconds=ready,
        )

    through = start_stack(stack, work)
    if through is not None:
        systems["stack"] = through
    return systems, servers


def start_stack(stack: ExitStack, work: Path) -> System | None:
    """The service through Nginx -> gunicorn -> PgBouncer, with its own PostgreSQL."""
    if find_binary("nginx") is None:
        print("(nginx not installed: no Nginx + PgBouncer rows)")
        return None
    # The same app settings as the direct rows (rate limits off, same pool), and an Nginx
    # limit_req the load never reaches: this measures the proxies, not the limiters.
    app_env = {
        key: value
        for key, value in base_env("").items()
        if key in {"ENVIRONMENT", "LOG_LEVEL", "RATE_LIMIT_ENABLED", "GATEWAY_REQUIRED"}
        or key.startswith("SQLALCHEMY_")
    }
    nginx_env = {"LIMIT_REQ_RATE": "1000000r/s", "LIMIT_REQ_BURST": "1000000"}
    running = stack.enter_context(
        Stack(
            work / "stack",
            app_instances=1,
            workers=WORKERS,
            redis=False,
            app_env=app_env,
            nginx_env=nginx_env,
        )
    )

    nginx, pgbouncer, postgres = running.nginx, running.pgbouncer, running.postgres
    assert nginx is not None
    assert pgbouncer is not None
    assert postgres is not None

    def server_roots() -> list[int]:
        roots = [instance.master_pid for instance in running.instances]
        return [*roots, nginx.pid, pgbouncer.pid]

    system = System(
        "stack",
        running.url,
        server_roots=server_roots,
        db_roots=lambda: [postmaster_pid(postgres.pgdata)],
        headers=running.headers,
    )
    ids = seed(system.base_url, running.api_key)
    system.task_id = ids[len(ids) // 2]
    print(f"stack: {running.pgbouncer_description()}")
    return system


def main() -> int:
    if find_binary("wrk") is None:
        print("make bench needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fastapi-app-bench-"))
    try:
        with ExitStack() as stack:
            systems, servers = start_systems(stack, work)
            rows = plan("stack" in systems)
            print(f"\nfastapi-app bench: {machine_description()}")
            print(
                f"{WORKERS} workers per server, {CONNECTIONS} and {LOW_CONNECTIONS} connections, "
                f"{ROUNDS} rounds of {SECONDS} s per row after a {WARMUP_SECONDS} s warm-up\n"
            )
            if WARMUP_SECONDS:
                # Discarded: pools open lazily, caches fill, the first requests of a worker pay
                # for its imports. The figures are for a service that has been up a while.
                for row in rows:
                    measure(systems[row.system], row, WARMUP_SECONDS)
            runs: dict[Row, list[Measurement]] = {row: [] for row in rows}
            for round_number in range(ROUNDS):
                order = rows if round_number % 2 == 0 else list(reversed(rows))
                for row in order:
                    runs[row].append(measure(systems[row.system], row, SECONDS))
                print(f"round {round_number + 1}/{ROUNDS} done", flush=True)
            rss = [rss_mb(pid) for pid in systems["service"].worker_pids()]
            report(rows, runs, rss, startup_seconds(work))
            # The systems above keep their pools open (64 connections each); with them up, the
            # experiment's fresh server met PostgreSQL's max_connections and its control run
            # counted hundreds of errors. It runs alone, on the same PostgreSQL.
            servers.close()
            replica_experiment(systems["service"], work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def startup_seconds(work: Path, starts: int = 3) -> float:
    """Median time from ``python -m service serve`` to its first 200 on /health/ready, over
    fresh starts made one at a time once the rounds are over (the start measured when every
    system boots at once, on two cores, is mostly the others' boots)."""
    assert POSTGRES is not None
    timings = []
    for _ in range(starts):
        env, port = service_env(POSTGRES.url, work / "metrics-startup")
        with serve([sys.executable, "-m", "service", "serve"], env, "/health/ready", port) as (
            _,
            ready,
        ):
            timings.append(ready)
    print("start to ready, fresh starts (s): " + ", ".join(f"{t:.2f}" for t in timings))
    return statistics.median(timings)


# --- reads on a streaming replica (a separate experiment) -------------------------------------
def load(url: str, key: str) -> WrkResult:
    """One warmed-up wrk run outside the alternating rounds (the replica experiment)."""
    headers = {"X-API-Key": key}
    if WARMUP_SECONDS:
        run(url, connections=CONNECTIONS, duration_s=WARMUP_SECONDS, headers=headers)
    return run(url, connections=CONNECTIONS, duration_s=SECONDS, headers=headers)


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
        runs: list[tuple[str, ReplicaRun]] = []
        for name, read_url in (
            ("GET /v1/tasks/{id}  direct, control", None),
            ("GET /v1/tasks/{id}  reads on the replica", replica.url),
        ):
            extra = {"DATABASE_READ_URL": read_url} if read_url else {}
            env, port = service_env(pg.url, work / f"metrics-{len(runs)}", **extra)
            before = _settled_transactions(pg)
            with serve([sys.executable, "-m", "service", "serve"], env, "/health/ready", port):
                base = f"http://127.0.0.1:{port}"
                if read_url:
                    wait_until(
                        partial(_replica_streaming, base),
                        timeout=30,
                        what="replica streaming",
                    )
                result = load(f"{base}/v1/tasks/{task_id}", key)
                reads, requests = _reads_by_target(int(env["METRICS_PORT"]))
            after = _settled_transactions(pg)
            runs.append((name, ReplicaRun(result, after - before, reads, requests)))
        return runs
    finally:
        replica.stop(mode="immediate")


# --- the report --------------------------------------------------------------------------------
def report(
    rows: list[Row], runs: dict[Row, list[Measurement]], rss: list[float], ready: float
) -> None:
    figures = {row: Figures.median(runs[row]) for row in rows}
    header = (
        f"{'row':<44} {'conns':>5} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
        f"{'CPU us/req':>10} {'PG us/req':>9} {'other CPU':>9}"
    )
    print("\nMedians of the rounds (CPU us/req: the server's processes; PG: PostgreSQL's)\n")
    print(header)
    print("-" * len(header))
    for row in rows:
        f = figures[row]
        print(
            f"{row.label:<44} {row.connections:>5} {f.rps:>8.0f} {f.p50:>7.1f} {f.p99:>7.1f} "
            f"{f.errors:>6} {f.server_us:>10.0f} {f.db_us:>9.0f} {f.other_pct:>8.0f}%"
        )

    print("\nEach round (req/s | CPU us/req)\n")
    for row in rows:
        cells = "  ".join(f"{m.rps:>6.0f} | {m.server_us:>5.0f}" for m in runs[row])
        print(f"{row.label:<44} {row.connections:>5}  {cells}")

    def find(system: str, op: str, connections: int) -> Figures | None:
        for row in rows:
            if (row.system, row.op, row.connections) == (system, op, connections):
                return figures[row]
        return None

    checks: list[tuple[str, float, str, bool]] = []
    for op, limit in (("get", 1.5), ("list", 1.5), ("post", 2.0)):
        service, ceiling = find("service", op, CONNECTIONS), find("fastapi", op, CONNECTIONS)
        if service and ceiling:
            ratio = service.server_us / ceiling.server_us
            checks.append(
                (f"CPU/req {op}: service / fastapi", ratio, f"<= {limit}x", ratio <= limit)
            )
    for op in ("get", "list", "post"):
        service, ceiling = find("service", op, CONNECTIONS), find("fastapi", op, CONNECTIONS)
        if service and ceiling:
            ratio = service.p99 / ceiling.p99
            label = f"p99 {op} at {CONNECTIONS}: service / fastapi"
            checks.append((label, ratio, "<= 2x", ratio <= 2.0))
    for op in ("get", "list", "post"):
        service = find("service", op, LOW_CONNECTIONS)
        if service:
            label = f"p99 {op} at {LOW_CONNECTIONS} connections (ms)"
            checks.append((label, service.p99, "< 25", service.p99 < 25))
    for op in ("get", "list"):
        through, direct = find("stack", op, CONNECTIONS), find("service", op, CONNECTIONS)
        if through and direct:
            ratio = through.rps / direct.rps
            label = f"req/s {op}: nginx+pgbouncer / direct"
            checks.append((label, ratio, ">= 0.70", ratio >= 0.70))
    if rss:
        checks.append(("RSS per worker, largest (MB)", max(rss), "<= 120", max(rss) <= 120))
    checks.append(("start to ready (s)", ready, "<= 3", ready <= 3))

    print("\nRatios and targets\n")
    for label, value, target, ok in checks:
        print(f"{label:<48} {value:>8.2f}  target {target:<8} {'ok' if ok else 'MISSED'}")
    if any(figures[row].errors for row in rows):
        print("\nWARNING: a row counted errors (non-2xx or socket errors): its figures are")
        print("not a measurement of the service working; look into it before quoting them.")
    noisy = [row.label for row in rows if figures[row].other_pct > 10]
    if noisy:
        print(f"\nNOTE: other processes took > 10 % of the CPUs during {len(noisy)} row(s);")
        print("CPU per request is robust to that, req/s and latencies less so.")


def replica_experiment(service: System, work: Path) -> None:
    """GET by id with and without a streaming replica, and what the primary was spared."""
    if POSTGRES is None or os.environ.get("BENCH_REPLICA", "1") == "0":
        return
    key = service.headers["X-API-Key"]
    replica_runs = run_with_replica(POSTGRES, work, key, service.task_id)
    print(
        f"\nReads on a streaming replica ({CONNECTIONS} connections, {SECONDS} s, one run each)\n"
    )
    for name, replica_run in replica_runs:
        result = replica_run.result
        print(
            f"{name:<44} {result.requests_per_second:>8.0f} req/s  p99 {result.p99_ms:>6.1f} ms"
            f"  errors {result.errors}"
        )
        print(f"    {replica_run.describe()}")
    if len(replica_runs) == 2:
        control, replica = (r for _, r in replica_runs)
        spared = 1 - replica.primary_per_request / max(control.primary_per_request, 1e-9)
        print(
            f"the primary was spared {spared:.0%} of its transactions per read "
            f"({control.primary_per_request:.3f} -> {replica.primary_per_request:.3f})"
        )


if __name__ == "__main__":
    sys.exit(main())
