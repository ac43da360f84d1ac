"""The whole fastapi-app stack on loopback, from the project's own configs (``make stack``).

    Nginx (nginx/render.py) -> N x ``python -m service serve`` (gunicorn + uvicorn workers)
        -> PgBouncer, transaction pooling (pgbouncer/render.py) -> PostgreSQL
        (PgBouncer tracks prepared statements and the app runs in pgbouncer-prepared mode when
        a PgBouncer >= 1.21 is there, ``make pgbouncer``; else Debian's 1.18 and
        pgbouncer-transaction mode)
        (+ Redis for the shared rate-limit counters, when ``redis-server`` is installed)
        (+ with ``replica=True`` / ``STACK_REPLICA=1``: a streaming replica of the embedded
        PostgreSQL, made with ``pg_basebackup -R`` over a replication slot, fronted by the same
        PgBouncer as ``<db>_replica`` and given to the instances as ``DATABASE_READ_URL``)

PostgreSQL is the one given (``DATABASE_URL`` for ``make stack``, ``database_url=`` here) or an
embedded PostgreSQL 16 in the work directory. Migrations run the way the Helm hook runs them:
``python -m service migrate`` with ``DATABASE_MIGRATION_URL`` pointing *directly* at PostgreSQL
(the advisory lock does not survive PgBouncer's transaction pooling). Then an API key is minted
with ``python -m service create-api-key``.

Every process runs on a free 127.0.0.1 port, is tracked by PID and stopped by ``close()`` (also
on errors and Ctrl-C). PgBouncer refuses to run as root, and Nginx and Redis should not either:
when this runs as root they run as the unprivileged system user the embedded PostgreSQL uses.

The tests (tests/stack) use the same class and its controls: take an app instance out of
rotation and restart it the way a rolling update does, stop/start PostgreSQL, PgBouncer, Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, TypeVar

import httpx

from service.settings import Settings
from service.tools.embedded_postgres import EmbeddedPostgres
from tools import pgbouncer_admin
from tools.kit import (
    REPO,
    drop_to,
    find_binary,
    find_pgbouncer,
    free_port,
    load_module,
    make_traversable,
    port_open,
    unprivileged_user,
    wait_until,
)

T = TypeVar("T")

UNPRIVILEGED_USER = "pgserver"  # the embedded PostgreSQL's system user (created on first use)
SETTINGS_VARS = {name.upper() for name in Settings.model_fields} | {"SECRETS_DIR"}
OWNER = "stack"
SCOPES = "tasks:read,tasks:write"


class StackError(RuntimeError):
    """A component did not come up; the message carries the tail of its log."""


def _run_async(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion even when the caller is inside an event loop (a test)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(make()))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def _children(pid: int) -> set[int]:
    try:
        return {
            int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        }
    except OSError:
        return set()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@dataclass
class Managed:
    """One long-running child process: its own session (so its whole group can be killed),
    output appended to a log file, optionally run as an unprivileged user."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    run_as: pwd.struct_passwd | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Managed:
        if self.running():
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        kwargs = drop_to(self.run_as)
        with self.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} start {self.name}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                **kwargs,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send(self, signum: int) -> None:
        if self.running():
            os.kill(self.pid, signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send ``signum``, wait up to ``timeout``, then SIGKILL whatever is left of the group."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(5)
        # Children the leader left behind (gunicorn workers, nginx workers) share its group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        return self.process.returncode

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def fail(self, what: str) -> StackError:
        return StackError(f"{self.name}: {what}\n--- {self.log_path} (tail) ---\n{self.log_tail()}")


@dataclass
class AppInstance:
    """One ``python -m service serve`` (a gunicorn master and its workers): a pod, on a VM."""

    index: int
    port: int
    metrics_port: int
    metrics_dir: Path
    process: Managed | None = None
    generation: int = 0

    @property
    def name(self) -> str:
        return f"app{self.index}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def master_pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def worker_pids(self) -> set[int]:
        if self.process is None or not self.process.running():
            return set()
        return _children(self.master_pid)

    def running(self) -> bool:
        return self.process is not None and self.process.running()


@dataclass
class RestartTimings:
    drained_s: float  # taken out of Nginx and in-flight requests finished
    stopped_s: float  # SIGTERM until the master exited
    ready_s: float  # new process start until /health/ready answered 200
    routed_s: float  # back in Nginx's upstream
    exit_code: int | None


@dataclass
class Stack:
    """Nginx -> app instances -> PgBouncer -> PostgreSQL (+ Redis), all on 127.0.0.1.

    ``with Stack(work_dir) as stack:`` starts everything and stops it on exit. ``app_env`` and
    ``nginx_env`` override the app's Settings variables and nginx/render.py's variables.
    """

    work_dir: Path | None = None
    app_instances: int = 2
    workers: int = 1
    database_url: str | None = None
    redis: bool | None = None  # None: when redis-server is installed
    app_env: Mapping[str, str] = field(default_factory=dict)
    nginx_env: Mapping[str, str] = field(default_factory=dict)
    # `make stack`: Settings variables from the caller's environment reach the app instances.
    inherit_settings: bool = False
    graceful_timeout: int = 20
    # A streaming replica of the embedded PostgreSQL for reads (needs the embedded one).
    replica: bool = False
    # PgBouncer tracking prepared statements, the app in pgbouncer-prepared mode (as the chart
    # runs it); False: Debian's 1.18 and pgbouncer-transaction mode. None: whenever a PgBouncer
    # >= 1.21 is there (`make pgbouncer`).
    pgbouncer_prepared: bool | None = None
    # The config directories to render from: the shipped ones, or a candidate change.
    nginx_source: Path = REPO / "nginx"
    pgbouncer_source: Path = REPO / "pgbouncer"
    # Keep the work directory (logs!) after close() even when this stack made it.
    keep_work_dir: bool = False
    say: Callable[[str], None] = lambda message: None

    def __post_init__(self) -> None:
        self._own_work_dir = self.work_dir is None
        self.work_dir = Path(self.work_dir or tempfile.mkdtemp(prefix="fastapi-app-stack-"))
        self.work_dir = self.work_dir.resolve()
        self.logs_dir = self.work_dir / "logs"
        self.run_as = unprivileged_user(UNPRIVILEGED_USER)
        self.postgres: EmbeddedPostgres | None = None
        self.direct_url = ""  # postgresql+asyncpg:// straight to PostgreSQL (migrations)
        self.pooled_url = ""  # postgresql+asyncpg:// through PgBouncer (the app's DATABASE_URL)
        self.replica_server: EmbeddedPostgres | None = None
        self.pooled_read_url = ""  # through PgBouncer's replica entry (DATABASE_READ_URL)
        self.api_key = ""
        self.owner = OWNER
        self.instances: list[AppInstance] = []
        self.routed: list[int] = []
        self.nginx_port = 0
        self.nginx_status_port = 0
        self.pgbouncer_port = 0
        self.redis_port = 0
        self.nginx: Managed | None = None
        self.pgbouncer: Managed | None = None
        self.redis_server: Managed | None = None
        self._nginx_render: ModuleType | None = None
        self._pgbouncer_render: ModuleType | None = None
        self._pgbouncer_rendered: Any = None
        self._closed = False

    # --- context manager ------------------------------------------------------------------------
    def __enter__(self) -> Stack:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- addresses ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The public entry point: Nginx."""
        return f"http://127.0.0.1:{self.nginx_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0" if self.redis_port else ""

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key}

    @property
    def direct_libpq_url(self) -> str:
        return self.direct_url.replace("postgresql+asyncpg://", "postgresql://", 1)

    @property
    def uses_redis(self) -> bool:
        return bool(self.redis_port)

    # --- start / close --------------------------------------------------------------------------
    def start(self) -> Stack:
        assert self.work_dir is not None
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.run_as is not None:
            # Daemons running as the unprivileged user must reach their directories in here.
            make_traversable(self.work_dir)
        self.logs_dir.mkdir(exist_ok=True)
        self.logs_dir.chmod(0o777)
        self._check_binaries()
        started = time.monotonic()
        self._start_postgres()
        self._migrate()
        self.pgbouncer_port = free_port()
        self._render_pgbouncer()
        self.start_pgbouncer()
        if self.redis is None:
            self.redis = find_binary("redis-server") is not None
        if self.redis:
            self.redis_port = free_port()
            self.start_redis()
        for index in range(self.app_instances):
            metrics_dir = self.work_dir / f"metrics-{index}"
            self.instances.append(AppInstance(index, free_port(), free_port(), metrics_dir))
        for instance in self.instances:
            self._spawn_instance(instance)
        for instance in self.instances:
            self._wait_ready(instance)
        self.nginx_port, self.nginx_status_port = free_port(), free_port()
        self.routed = [instance.index for instance in self.instances]
        self._render_nginx()
        self.start_nginx()
        self.api_key = self.create_api_key(self.owner)
        self.say(f"stack up in {time.monotonic() - started:.1f} s")
        return self

    def close(self) -> None:
        """Stop everything this stack started, front to back. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        steps: list[tuple[str, Callable[[], object]]] = [
            ("nginx", lambda: self.nginx and self.nginx.stop(signal.SIGQUIT, timeout=5)),
        ]
        steps += [
            (instance.name, lambda instance=instance: self._terminate(instance, timeout=10))  # type: ignore[misc]
            for instance in self.instances
        ]
        steps += [
            ("pgbouncer", lambda: self.pgbouncer and self.pgbouncer.stop(signal.SIGTERM, 5)),
            ("redis", lambda: self.redis_server and self.redis_server.stop(signal.SIGTERM, 5)),
            ("postgres", self._stop_postgres_for_good),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # keep stopping the rest
                errors.append(f"{name}: {exc}")
        if self._own_work_dir and not self.keep_work_dir and self.work_dir and not errors:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        if errors:
            raise StackError("while stopping the stack: " + "; ".join(errors))

    # --- PostgreSQL -----------------------------------------------------------------------------
    def _start_postgres(self) -> None:
        assert self.work_dir is not None
        if self.database_url:
            if self.replica:
                raise StackError("a replica needs the embedded PostgreSQL (no DATABASE_URL)")
            from service.settings import normalise_database_url

            self.direct_url = normalise_database_url(self.database_url)
            return
        self.postgres = EmbeddedPostgres(self.work_dir / "postgres").start()
        self.direct_url = self.postgres.url
        # What the PgBouncer notes ask operators to do: in transaction pooling the app cannot
        # send statement_timeout as a startup parameter, so the role carries it.
        self.postgres.psql(f"ALTER ROLE \"{self.postgres.user}\" SET statement_timeout = '5s'")
        if self.replica:
            self.replica_server = self.postgres.create_replica(
                self.work_dir / "replica", slot="stack_replica"
            )
            self.replica_server.start()
            self.say(f"streaming replica on 127.0.0.1:{self.replica_server.port}")

    def stop_replica(self, mode: str = "fast") -> None:
        if self.replica_server is None:
            raise StackError("this stack has no replica (replica=True / STACK_REPLICA=1)")
        self.replica_server.stop(mode=mode)

    def start_replica(self) -> None:
        if self.replica_server is None:
            raise StackError("this stack has no replica (replica=True / STACK_REPLICA=1)")
        self.replica_server.start()

    def stop_postgres(self, mode: str = "fast") -> None:
        """Stop the embedded PostgreSQL (fast: connections are terminated, like a failover)."""
        if self.postgres is None:
            raise StackError("this stack does not own its PostgreSQL (database_url was given)")
        self.postgres.stop(mode=mode)

    def start_postgres(self) -> None:
        """Start it again, on the same port with the same password; returns once it accepts
        connections (pg_ctl -w)."""
        if self.postgres is None:
            raise StackError("this stack does not own its PostgreSQL (database_url was given)")
        self.postgres.start()

    def _stop_postgres_for_good(self) -> None:
        if self.replica_server is not None:
            with contextlib.suppress(Exception):
                self.replica_server.stop(mode="immediate")
        if self.postgres is None:
            return
        try:
            self.postgres.stop(mode="immediate")
        except Exception:
            pid_file = self.postgres.pgdata / "postmaster.pid"
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
            raise

    def psql(self, sql: str) -> str:
        """Run SQL as the superuser in the app database (embedded PostgreSQL only)."""
        if self.postgres is None:
            raise StackError("psql needs the embedded PostgreSQL")
        return self.postgres.psql(sql, database=self.postgres.database)

    def _migrate(self) -> None:
        # Exactly the Helm hook Job: `python -m service migrate`, direct connection.
        env = self._app_env_base()
        env["DATABASE_MIGRATION_URL"] = self.direct_url
        env["DATABASE_URL"] = self.direct_url
        result = subprocess.run(
            [sys.executable, "-m", "service", "migrate"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"migrate failed: {result.stderr.strip()[-2000:]}")
        self.say(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "migrated")

    # --- PgBouncer ------------------------------------------------------------------------------
    def _render_pgbouncer(self) -> None:
        assert self.work_dir is not None
        render = self._pgbouncer_render = load_module(
            self.pgbouncer_source / "render.py", "fastapi_app_pgbouncer_render"
        )
        out = self.work_dir / "pgbouncer"
        upstream = render.Upstream.from_url(self.direct_libpq_url)
        replica = (
            render.Upstream.from_url(
                self.replica_server.libpq_url, alias=f"{upstream.dbname}_replica"
            )
            if self.replica_server is not None
            else None
        )
        binary = find_pgbouncer(prepared_statements=bool(self.pgbouncer_prepared))
        if self.pgbouncer_prepared is None:
            prepared = find_pgbouncer(prepared_statements=True)
            self.pgbouncer_prepared = prepared is not None
            binary = prepared or binary
        if binary is None:
            wanted = ">= 1.21 (make pgbouncer)" if self.pgbouncer_prepared else "(apt-get install)"
            raise StackError(f"pgbouncer {wanted} is not installed")
        rendered = render.render(
            out,
            upstream,
            listen_port=self.pgbouncer_port,
            replica=replica,
            prepared_statements=self.pgbouncer_prepared,
        )
        self._pgbouncer_rendered = rendered
        self._own(out)
        user, password = rendered_credentials(self.direct_libpq_url)
        self.pooled_url = rendered.client_url(user, password, scheme="postgresql+asyncpg")
        if rendered.replica_database is not None:
            self.pooled_read_url = rendered.client_url(
                user, password, scheme="postgresql+asyncpg", database=rendered.replica_database
            )
        self.pgbouncer = Managed(
            "pgbouncer",
            [binary, str(rendered.ini)],
            self.logs_dir / "pgbouncer.log",
            env={"PATH": os.environ.get("PATH", "")},
            cwd=out,
            run_as=self.run_as,
        )

    def pgbouncer_show(self, command: str) -> list[dict[str, str]]:
        """A SHOW command on PgBouncer's admin console (SHOW STATS, SHOW POOLS …)."""
        rendered = self._pgbouncer_rendered
        if rendered is None:
            raise StackError("PgBouncer is not configured yet")
        return pgbouncer_admin.show(
            rendered.listen_port, rendered.admin_user, rendered.admin_password, command
        )

    def pgbouncer_description(self) -> str:
        """Which PgBouncer runs and how the app talks to it, for reports."""
        assert self.pgbouncer is not None
        assert self._pgbouncer_render is not None
        binary = self.pgbouncer.argv[0]
        version = self._pgbouncer_render.installed_version(binary)
        shown = ".".join(map(str, version)) if version else "?"
        return f"PgBouncer {shown} ({binary}), the app in {self.pool_mode} mode"

    @property
    def pool_mode(self) -> str:
        """The app's DATABASE_POOL_MODE for this stack's PgBouncer."""
        return "pgbouncer-prepared" if self.pgbouncer_prepared else "pgbouncer-transaction"

    def start_pgbouncer(self) -> None:
        assert self.pgbouncer is not None
        self.pgbouncer.start()
        self._wait_port(self.pgbouncer, self.pgbouncer_port)

    def stop_pgbouncer(self, signum: int = signal.SIGTERM) -> int | None:
        """SIGTERM, as Kubernetes stops the PgBouncer pod (1.18: immediate shutdown)."""
        assert self.pgbouncer is not None
        return self.pgbouncer.stop(signum, timeout=10)

    # --- Redis ----------------------------------------------------------------------------------
    def start_redis(self) -> None:
        assert self.work_dir is not None
        if self.redis_server is None:
            data = self.work_dir / "redis"
            data.mkdir(exist_ok=True)
            self._own(data)
            self.redis_server = Managed(
                "redis",
                [
                    _require("redis-server"),
                    "--bind", "127.0.0.1",
                    "--port", str(self.redis_port),
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(data),
                ],
                self.logs_dir / "redis.log",
                env={"PATH": os.environ.get("PATH", "")},
                cwd=data,
                run_as=self.run_as,
            )  # fmt: skip
        self.redis_server.start()
        self._wait_port(self.redis_server, self.redis_port)

    def stop_redis(self) -> int | None:
        assert self.redis_server is not None
        return self.redis_server.stop(signal.SIGTERM, timeout=10)

    # --- app instances --------------------------------------------------------------------------
    def _app_env_base(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if self.inherit_settings or key.upper() not in SETTINGS_VARS
        }
        env.setdefault("ENVIRONMENT", "production")
        env.setdefault("GATEWAY_REQUIRED", "false")  # Nginx is the edge here, no API gateway
        env.setdefault("LOG_LEVEL", "INFO")
        env.update(self.app_env)
        return env

    def app_environment(self, instance: AppInstance) -> dict[str, str]:
        env = self._app_env_base()
        env.update(
            {
                "HOST": "127.0.0.1",
                "PORT": str(instance.port),
                "METRICS_PORT": str(instance.metrics_port),
                "PROMETHEUS_MULTIPROC_DIR": str(instance.metrics_dir),
                "DATABASE_URL": self.pooled_url,
                "DATABASE_MIGRATION_URL": self.direct_url,
                "DATABASE_POOL_MODE": self.pool_mode,
                "FORWARDED_ALLOW_IPS": "127.0.0.1",
            }
        )
        env.setdefault("WEB_CONCURRENCY", str(self.workers))
        env.setdefault("GUNICORN_GRACEFUL_TIMEOUT", str(self.graceful_timeout))
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        if self.pooled_read_url:
            env["DATABASE_READ_URL"] = self.pooled_read_url
        for key, value in self.app_env.items():
            env[key] = value
        return env

    def _spawn_instance(self, instance: AppInstance) -> None:
        instance.generation += 1
        instance.process = Managed(
            f"{instance.name}#{instance.generation}",
            [sys.executable, "-m", "service", "serve"],
            self.logs_dir / f"{instance.name}.log",
            env=self.app_environment(instance),
            cwd=REPO,
        ).start()

    def _wait_ready(self, instance: AppInstance, timeout: float = 30.0) -> None:
        assert instance.process is not None
        process = instance.process

        def ready() -> bool:
            if not process.running():
                raise process.fail(f"exited with {process.process and process.process.returncode}")
            try:
                return httpx.get(f"{instance.url}/health/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(ready, timeout=timeout, interval=0.05, what=f"{instance.name} ready")
        except TimeoutError:
            raise process.fail(f"not ready after {timeout:g} s") from None

    def _terminate(self, instance: AppInstance, timeout: float | None = None) -> int | None:
        if instance.process is None:
            return None
        limit = timeout if timeout is not None else self.graceful_timeout + 5
        return instance.process.stop(signal.SIGTERM, timeout=limit)

    def stop_instance(self, index: int, *, drain: bool = True) -> int | None:
        """Take an instance out of Nginx (when ``drain``), then SIGTERM it; returns its exit code.

        Open-source Nginx has no API and no active health checks, so "stop routing" is what
        service discovery does on VMs (consul-template and friends): re-render the upstream
        without the instance and reload Nginx gracefully. The old Nginx workers finish the
        requests they have in flight and close their keep-alive connections to the instance;
        once they have exited, nothing can reach it any more and SIGTERM only has to let
        gunicorn wind down. ``drain=False`` is a crash-like stop: Nginx still routes to it.
        """
        if drain and index in self.routed:
            self.route([i for i in self.routed if i != index])
        return self._terminate(self.instances[index])

    def start_instance(self, index: int, *, route: bool = True) -> None:
        """Start a new process for the instance (same ports), wait until ready, route to it."""
        instance = self.instances[index]
        if instance.running():
            raise StackError(f"{instance.name} is running")
        self._spawn_instance(instance)
        self._wait_ready(instance)
        if route and index not in self.routed:
            self.route(sorted([*self.routed, index]))

    def restart_instance(self, index: int) -> RestartTimings:
        """A rolling-update step: stop routing, SIGTERM, start a new one, wait ready, route."""
        t0 = time.monotonic()
        self.route([i for i in self.routed if i != index])
        t1 = time.monotonic()
        exit_code = self._terminate(self.instances[index])
        t2 = time.monotonic()
        self.start_instance(index, route=False)
        t3 = time.monotonic()
        self.route(sorted([*self.routed, index]))
        t4 = time.monotonic()
        return RestartTimings(t1 - t0, t2 - t1, t3 - t2, t4 - t3, exit_code)

    def heal(self) -> None:
        """Bring back whatever a test stopped, so the next test starts from a whole stack."""
        if self.postgres is not None and not self.postgres.is_running():
            self.start_postgres()
        if self.replica_server is not None and not self.replica_server.is_running():
            self.start_replica()
        if self.pgbouncer is not None and not self.pgbouncer.running():
            self.start_pgbouncer()
        if self.redis_server is not None and not self.redis_server.running():
            self.start_redis()
        for instance in self.instances:
            if not instance.running():
                self.start_instance(instance.index, route=False)
            else:
                self._wait_ready(instance)
        if self.nginx is None or not self.nginx.running():
            self.routed = [instance.index for instance in self.instances]
            self._render_nginx()
            self.start_nginx()
        elif self.routed != [instance.index for instance in self.instances]:
            self.route([instance.index for instance in self.instances])

    def create_api_key(self, owner: str, scopes: str = SCOPES) -> str:
        """``python -m service create-api-key``: the plaintext key is its last stdout line."""
        env = self._app_env_base()
        env["DATABASE_URL"] = self.direct_url
        result = subprocess.run(
            [sys.executable, "-m", "service", "create-api-key", "--owner", owner,
             "--scopes", scopes, "--name", "stack"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise StackError(f"create-api-key failed: {result.stderr.strip()[-2000:]}")
        return result.stdout.strip().splitlines()[-1]

    # --- Nginx ----------------------------------------------------------------------------------
    def nginx_environment(self, indexes: Iterable[int]) -> dict[str, str]:
        assert self.work_dir is not None
        render = self._nginx_module()
        env: dict[str, str] = {}
        if self.inherit_settings:
            env.update({k: v for k, v in os.environ.items() if k in render.DEFAULTS})
        env.update(
            {
                "LISTEN_PORT": str(self.nginx_port),
                "STATUS_LISTEN": f"127.0.0.1:{self.nginx_status_port}",
                "ACCESS_LOG": str(self.logs_dir / "nginx-access.log"),
                "APP_METRICS_PORT": str(self.instances[0].metrics_port),
            }
        )
        env.update(self.nginx_env)
        env["UPSTREAM_SERVERS"] = " ".join(self.instances[i].address for i in indexes)
        return env

    def _nginx_module(self) -> ModuleType:
        if self._nginx_render is None:
            self._nginx_render = load_module(
                self.nginx_source / "render.py", "fastapi_app_nginx_render"
            )
        return self._nginx_render

    @property
    def nginx_dir(self) -> Path:
        assert self.work_dir is not None
        return self.work_dir / "nginx"

    def _render_nginx(self) -> None:
        if not self.routed:
            raise StackError("nginx needs at least one routed instance")
        self._nginx_module().render(
            self.nginx_dir, self.nginx_environment(self.routed), foreground=True
        )
        self._own(self.nginx_dir)

    def _nginx_argv(self, *extra: str) -> list[str]:
        conf = self.nginx_dir / "nginx.conf"
        return [
            _require("nginx"),
            "-e",
            "stderr",
            "-p",
            str(self.nginx_dir),
            "-c",
            str(conf),
            *extra,
        ]

    def _nginx_test(self) -> None:
        result = subprocess.run(
            self._nginx_argv("-t", "-q"),
            capture_output=True,
            text=True,
            check=False,
            user=self.run_as.pw_uid if self.run_as else None,
            group=self.run_as.pw_gid if self.run_as else None,
            extra_groups=[] if self.run_as else None,
        )
        if result.returncode != 0:
            raise StackError(f"nginx -t failed: {result.stderr.strip()}")

    def start_nginx(self) -> None:
        self._nginx_test()
        self.nginx = Managed(
            "nginx",
            self._nginx_argv(),
            self.logs_dir / "nginx.log",
            env={"PATH": os.environ.get("PATH", "")},
            cwd=self.nginx_dir,
            run_as=self.run_as,
        ).start()
        nginx = self.nginx

        def serving() -> bool:
            if not nginx.running():
                raise nginx.fail("exited")
            try:
                return httpx.get(f"{self.url}/health/live", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(serving, timeout=15, what="nginx serving /health/live")

    def nginx_workers(self) -> set[int]:
        return _children(self.nginx.pid) if self.nginx and self.nginx.running() else set()

    def route(self, indexes: Iterable[int], *, timeout: float = 15.0) -> float:
        """Point Nginx's upstream at exactly these instances: re-render, ``nginx -t``, graceful
        reload (SIGHUP), and wait until every old worker has exited, i.e. every request that
        was in flight under the old upstream has completed. Returns the seconds that took."""
        assert self.nginx is not None
        started = time.monotonic()
        self.routed = sorted(set(indexes))
        self._render_nginx()
        self._nginx_test()
        old = self.nginx_workers()
        self.nginx.send(signal.SIGHUP)
        nginx = self.nginx

        def reloaded() -> bool:
            if not nginx.running():
                raise nginx.fail("exited during reload")
            workers = self.nginx_workers()
            return bool(workers - old) and not any(_alive(pid) for pid in old)

        wait_until(reloaded, timeout=timeout, interval=0.02, what="nginx reload")
        return time.monotonic() - started

    # --- helpers --------------------------------------------------------------------------------
    def _check_binaries(self) -> None:
        _require("nginx")
        if find_pgbouncer(prepared_statements=bool(self.pgbouncer_prepared)) is None:
            _require("pgbouncer")

    def _own(self, path: Path) -> None:
        """Hand a directory tree to the unprivileged daemon user."""
        if self.run_as is None:
            return
        uid, gid = self.run_as.pw_uid, self.run_as.pw_gid
        os.chown(path, uid, gid)
        for root, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                os.chown(os.path.join(root, name), uid, gid)

    def _wait_port(self, process: Managed, port: int, timeout: float = 15.0) -> None:
        def listening() -> bool:
            if not process.running():
                raise process.fail("exited")
            return port_open(port)

        try:
            wait_until(listening, timeout=timeout, what=f"{process.name} on port {port}")
        except TimeoutError:
            raise process.fail(f"not listening on {port} after {timeout:g} s") from None

    def describe(self) -> str:
        lines = [
            f"  API (Nginx):     {self.url}   e.g. curl -H 'X-API-Key: $KEY' {self.url}/v1/tasks",
        ]
        for instance in self.instances:
            lines.append(
                f"  {instance.name}:            {instance.url}  metrics {instance.metrics_url}"
                f"  (gunicorn master pid {instance.master_pid})"
            )
        lines.append(
            f"  PgBouncer:       127.0.0.1:{self.pgbouncer_port} (transaction pooling; "
            f"{self.pgbouncer_description()})"
        )
        where = "embedded, " + str(self.postgres.data_dir) if self.postgres else "given"
        lines.append(f"  PostgreSQL:      {_mask(self.direct_libpq_url)} ({where})")
        if self.replica_server is not None:
            lines.append(
                f"  replica:         {_mask(self.replica_server.libpq_url)} (streaming; reads "
                f"via PgBouncer as {self.pooled_read_url.rsplit('/', 1)[-1]})"
            )
        lines.append(
            f"  Redis:           {self.redis_url}" if self.redis_url else "  Redis:           off"
        )
        lines.append(f"  logs:            {self.logs_dir}")
        lines.append(f"  API key (owner '{self.owner}'):\n    {self.api_key}")
        return "\n".join(lines)


def rendered_credentials(libpq_url: str) -> tuple[str, str]:
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(libpq_url)
    return unquote(parts.username or ""), unquote(parts.password or "")


def _mask(url: str) -> str:
    from service.settings import mask_url

    return mask_url(url)


def _require(name: str) -> str:
    found = find_binary(name)
    if found is None:
        raise StackError(f"{name} is not installed (apt-get install {name})")
    return found


@contextlib.contextmanager
def _signals_raise_interrupt() -> Iterator[None]:
    """SIGTERM (and SIGHUP) stop the launcher like Ctrl-C does: through the finally blocks."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main() -> int:
    """``make stack``: start everything, print the URL and key, stop everything on Ctrl-C."""
    instances = int(os.environ.get("STACK_INSTANCES", "2"))
    workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
    work_dir = Path(os.environ.get("STACK_DIR", ".data/stack"))
    # A fresh run each time; the embedded database is kept (like `make run`'s .data/postgres).
    replica = os.environ.get("STACK_REPLICA", "").lower() in {"1", "true", "yes"}
    # The replica is made afresh from the primary each run (pg_basebackup).
    for stale in ("nginx", "pgbouncer", "redis", "logs", "replica"):
        shutil.rmtree(work_dir / stale, ignore_errors=True)
    print(f"starting the stack in {work_dir} (Ctrl-C stops it) ...", flush=True)
    with _signals_raise_interrupt():
        try:
            with Stack(
                work_dir,
                app_instances=instances,
                workers=workers,
                database_url=os.environ.get("DATABASE_URL") or None,
                inherit_settings=True,
                replica=replica,
                say=lambda message: print(f"  {message}", flush=True),
            ) as stack:
                print(f"\nfastapi-app stack on {stack.url}\n{stack.describe()}\n", flush=True)
                print("Ctrl-C stops everything.", flush=True)
                while True:
                    for component in (stack.nginx, stack.pgbouncer, stack.redis_server):
                        if component is not None and not component.running():
                            raise component.fail("exited unexpectedly")
                    time.sleep(1)
        except KeyboardInterrupt:
            print("\nstopped.", flush=True)
        except StackError as error:
            print(f"stack failed: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
