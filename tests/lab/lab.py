"""The failure lab: the whole stack spread over separate hosts (network namespaces).

    client ── nginx ──┬── app1 ──┬── pgbouncer ── [faultproxy] postgres
                      └── app2 ──┴── redis

Hosts (tests/lab/netlab.py): ``client`` (the test's load threads), ``nginx``, ``app1`` and
``app2`` (``python -m service serve`` each, one worker: the scenarios are about links, not
CPUs), ``pgbouncer``, ``postgres``, ``redis``. Nothing is co-located. PostgreSQL itself listens
on 127.0.0.1 inside its host and a fault proxy (tests/lab/faultproxy.py) is its address on the
lab network, so the tests can slow its link down; blackholes are router rules.

Everything the service is configured with comes from the shipped configs (nginx/render.py,
pgbouncer/render.py, Settings defaults); the overrides are listed in ``APP_ENV``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from faultproxy import FaultProxy
from netlab import NetLab, enter
from traffic import Traffic

from service.settings import Settings
from service.tools.embedded_postgres import EmbeddedPostgres
from testkit import find_binary, libpq_url, load_module, wait_until
from tools.kit import drop_to, make_traversable, unprivileged_user
from tools.stack import UNPRIVILEGED_USER, rendered_credentials

REPO = Path(__file__).resolve().parents[2]
HOSTS = ["client", "nginx", "app1", "app2", "pgbouncer", "postgres", "redis"]
APP_PORT, METRICS_PORT, PG_PORT, PGB_PORT, REDIS_PORT, NGINX_PORT = (
    8000,
    9000,
    5432,
    6432,
    6379,
    8080,
)
# The bounds under test, as an operator would set them (each is a documented default).
APP_ENV = {
    "ENVIRONMENT": "production",
    "GATEWAY_REQUIRED": "false",
    "WEB_CONCURRENCY": "1",
    "LOG_LEVEL": "WARNING",
    "RATE_LIMIT_ENABLED": "true",
    "RATE_LIMIT_DEFAULT": "1000000/minute",
    "RATE_LIMIT_PER_IP": "1000000/minute",
    "DATABASE_POOL_MODE": "pgbouncer-transaction",
    "GUNICORN_GRACEFUL_TIMEOUT": "10",
}
NGINX_ENV = {"LIMIT_REQ_RATE": "100000r/s", "LIMIT_REQ_BURST": "100000"}
# The role carries what PgBouncer's transaction pooling cannot pass as startup parameters
# (pgbouncer/pgbouncer.ini notes): the statement timeout and the idle-in-transaction timeout.
# From the Settings defaults: what the docs tell operators to put on the app's role.
_FIELDS = Settings.model_fields
ROLE_SETTINGS = {
    "statement_timeout": f"{_FIELDS['database_statement_timeout_ms'].default}ms",
    "idle_in_transaction_session_timeout": (
        f"{_FIELDS['database_idle_in_transaction_timeout_ms'].default}ms"
    ),
}


class LabTraffic(Traffic):
    """tests/stack/traffic.py's client loops, run from the lab's client host."""

    def __init__(self, namespace: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.namespace = namespace

    def _guarded(self, index: int) -> None:
        enter(self.namespace)
        super()._guarded(index)


@dataclass
class Instance:
    name: str
    address: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{APP_PORT}"


class FailureLab:
    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="fastapi-app-lab-"))
        self.net = NetLab(HOSTS)
        self.run_as = unprivileged_user(UNPRIVILEGED_USER)
        self.postgres: EmbeddedPostgres | None = None
        self.pg_proxy: FaultProxy | None = None
        self.pgbouncer: subprocess.Popen[bytes] | None = None
        self.pgbouncer_argv: list[str] = []
        self.redis: subprocess.Popen[bytes] | None = None
        self.nginx: subprocess.Popen[bytes] | None = None
        self.instances: list[Instance] = []
        self.api_key = ""
        self.direct_url = ""
        self.pooled_url = ""

    # --- addresses ------------------------------------------------------------------------------
    def address(self, host: str) -> str:
        return self.net[host].address

    @property
    def url(self) -> str:
        return f"http://{self.address('nginx')}:{NGINX_PORT}"

    # --- start / stop ---------------------------------------------------------------------------
    def __enter__(self) -> FailureLab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        make_traversable(self.work)
        (self.work / "logs").mkdir()
        (self.work / "logs").chmod(0o777)
        self.net.create()
        self._start_postgres()
        self._migrate_and_mint_key()
        self._start_pgbouncer()
        self._start_redis()
        for name in ("app1", "app2"):
            instance = Instance(name, self.address(name))
            self.instances.append(instance)
            self.start_app(instance)
        for instance in self.instances:
            self.wait_ready(instance)
        self._start_nginx()

    def close(self) -> None:
        if self.pg_proxy is not None:
            self.pg_proxy.stop()
        self.net.destroy()  # every process it started, then the namespaces and links
        if self.postgres is not None:
            try:
                self.postgres.stop(mode="immediate")
            except Exception:
                pid_file = self.postgres.pgdata / "postmaster.pid"
                if pid_file.exists():
                    with_pid = int(pid_file.read_text().split()[0])
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(with_pid, 9)
        shutil.rmtree(self.work, ignore_errors=True)

    # --- PostgreSQL -----------------------------------------------------------------------------
    def _start_postgres(self) -> None:
        pg = self.postgres = EmbeddedPostgres(self.work / "postgres")
        self.net.call("postgres", pg.start)
        for name, value in ROLE_SETTINGS.items():
            self.psql(f"ALTER ROLE \"{pg.user}\" SET {name} = '{value}'")
        self.pg_proxy = FaultProxy(
            self.net["postgres"].namespace,
            (self.address("postgres"), PG_PORT),
            ("127.0.0.1", pg.port),
        ).start()
        self.direct_url = (
            f"postgresql+asyncpg://{pg.user}:{pg.password}@{self.address('postgres')}:"
            f"{PG_PORT}/{pg.database}"
        )

    def open_transaction_via_pgbouncer(self, name: str) -> subprocess.Popen[bytes]:
        """A client on app1 that opens a transaction through PgBouncer and then sits in it."""
        from service.tools.embedded_postgres import binaries_dir

        libpq = libpq_url(self.pooled_url)
        process = self.net.popen(
            "app1",
            [str(binaries_dir() / "psql"), "-X", "-q", libpq],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"PGAPPNAME": name, "PATH": os.environ.get("PATH", "")},
        )
        assert process.stdin is not None
        process.stdin.write(b"BEGIN;\nSELECT txid_current();\n")
        process.stdin.flush()
        return process

    def psql(self, sql: str) -> str:
        assert self.postgres is not None
        pg = self.postgres
        return self.net.call("postgres", pg.psql, sql, database=pg.database)

    def _service_env(self, **extra: str) -> dict[str, str]:
        from tools.stack import SETTINGS_VARS

        env = {k: v for k, v in os.environ.items() if k.upper() not in SETTINGS_VARS}
        env.update(APP_ENV)
        env["PYTHONPATH"] = str(REPO)
        # The lab's links are plaintext on purpose (the fault proxy reads and delays them);
        # production refuses that to a non-local host unless the host is listed.
        env["DATABASE_PLAINTEXT_ALLOWED_HOSTS"] = ",".join(
            self.address(host) for host in ("postgres", "pgbouncer")
        )
        env.update(extra)
        return env

    def _migrate_and_mint_key(self) -> None:
        env = self._service_env(
            DATABASE_URL=self.direct_url, DATABASE_MIGRATION_URL=self.direct_url
        )
        for argv in (
            [sys.executable, "-m", "service", "migrate"],
            [sys.executable, "-m", "service", "create-api-key", "--owner", "lab",
             "--scopes", "tasks:read,tasks:write", "--name", "lab"],
        ):  # fmt: skip
            result = self.net.call(
                "app1", subprocess.run, argv, cwd=REPO, env=env, capture_output=True, text=True,
                timeout=120, check=False,
            )  # fmt: skip
            if result.returncode != 0:
                raise RuntimeError(f"{argv[3]} failed: {result.stderr[-2000:]}")
        # The key is the last line create-api-key prints (migrate prints nothing here: it logs
        # JSON, and LOG_LEVEL=WARNING drops its info line).
        self.api_key = result.stdout.strip().splitlines()[-1]

    def create_api_key(self, owner: str) -> str:
        env = self._service_env(DATABASE_URL=self.direct_url)
        result = self.net.call(
            "app1", subprocess.run,
            [sys.executable, "-m", "service", "create-api-key", "--owner", owner,
             "--scopes", "tasks:read,tasks:write", "--name", "lab"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return str(result.stdout.strip().splitlines()[-1])

    # --- PgBouncer ------------------------------------------------------------------------------
    def _start_pgbouncer(self) -> None:
        render = load_module(REPO / "pgbouncer" / "render.py", "lab_pgbouncer_render")
        out = self.work / "pgbouncer"
        libpq = libpq_url(self.direct_url)
        rendered = render.render(
            out,
            render.Upstream.from_url(libpq),
            listen_port=PGB_PORT,
            listen_addr=self.address("pgbouncer"),
        )
        self._own(out)
        user, password = rendered_credentials(libpq)
        self.pooled_url = rendered.client_url(user, password, scheme="postgresql+asyncpg").replace(
            "127.0.0.1", self.address("pgbouncer"), 1
        )
        self.pgbouncer_argv = [_which("pgbouncer"), str(rendered.ini)]
        self.start_pgbouncer()

    def start_pgbouncer(self) -> None:
        self.pgbouncer = self._daemon("pgbouncer", self.pgbouncer_argv, "pgbouncer.log")
        self._wait_port("pgbouncer", PGB_PORT)

    # --- Redis ----------------------------------------------------------------------------------
    def _start_redis(self) -> None:
        data = self.work / "redis"
        data.mkdir()
        self._own(data)
        self.redis = self._daemon(
            "redis",
            [_which("redis-server"), "--bind", self.address("redis"), "--port", str(REDIS_PORT),
             "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", str(data)],
            "redis.log",
        )  # fmt: skip
        self._wait_port("redis", REDIS_PORT)

    # --- app instances --------------------------------------------------------------------------
    def app_env(self, instance: Instance) -> dict[str, str]:
        return self._service_env(
            HOST=instance.address,
            PORT=str(APP_PORT),
            METRICS_PORT=str(METRICS_PORT),
            PROMETHEUS_MULTIPROC_DIR=str(self.work / f"metrics-{instance.name}"),
            DATABASE_URL=self.pooled_url,
            DATABASE_MIGRATION_URL=self.direct_url,
            FORWARDED_ALLOW_IPS=self.address("nginx"),
            REDIS_URL=f"redis://{self.address('redis')}:{REDIS_PORT}/0",
        )

    def start_app(self, instance: Instance) -> None:
        log = (self.work / "logs" / f"{instance.name}.log").open("ab")
        instance.process = self.net.popen(
            instance.name,
            [sys.executable, "-m", "service", "serve"],
            cwd=REPO,
            env=self.app_env(instance),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def wait_ready(self, instance: Instance, timeout: float = 60) -> None:
        def ready() -> bool:
            assert instance.process is not None
            if instance.process.poll() is not None:
                raise RuntimeError(f"{instance.name} exited:\n{self.log_tail(instance.name)}")
            return self.get(f"{instance.url}/health/ready").status_code == 200

        wait_until(ready, timeout=timeout, interval=0.1, what=f"{instance.name} ready")

    def worker_pids(self) -> dict[str, set[int]]:
        pids: dict[str, set[int]] = {}
        for instance in self.instances:
            assert instance.process is not None
            path = Path(f"/proc/{instance.process.pid}/task/{instance.process.pid}/children")
            try:
                pids[instance.name] = {int(p) for p in path.read_text().split()}
            except OSError:
                pids[instance.name] = set()
        return pids

    # --- nginx ----------------------------------------------------------------------------------
    def _start_nginx(self) -> None:
        render = load_module(REPO / "nginx" / "render.py", "lab_nginx_render")
        out = self.work / "nginx"
        env = {
            "LISTEN_PORT": str(NGINX_PORT),
            "STATUS_LISTEN": "127.0.0.1:8081",
            "ACCESS_LOG": str(self.work / "logs" / "nginx-access.log"),
            "APP_METRICS_PORT": str(METRICS_PORT),
            "UPSTREAM_SERVERS": " ".join(f"{i.address}:{APP_PORT}" for i in self.instances),
            **NGINX_ENV,
        }
        render.render(out, env, foreground=True)
        self._own(out)
        self.nginx = self._daemon(
            "nginx",
            [_which("nginx"), "-e", "stderr", "-p", str(out), "-c", str(out / "nginx.conf")],
            "nginx.log",
            cwd=out,
        )
        wait_until(
            lambda: self.get(f"{self.url}/health/live").status_code == 200,
            timeout=20,
            what="nginx serving",
        )

    # --- helpers --------------------------------------------------------------------------------
    def get(self, url: str, timeout: float = 2.0, **kwargs: Any) -> httpx.Response:
        """A GET from the client host."""
        return self.net.call("client", httpx.get, url, timeout=timeout, **kwargs)

    def traffic(self, key: str, **kwargs: Any) -> LabTraffic:
        return LabTraffic(self.net["client"].namespace, self.url, key, **kwargs)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.work / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _daemon(
        self, host: str, argv: list[str], log_name: str, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        kwargs = drop_to(self.run_as)
        log = (self.work / "logs" / log_name).open("ab")
        try:
            return self.net.popen(
                host,
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd or self.work,
                env={"PATH": os.environ.get("PATH", "")},
                **kwargs,
            )
        finally:
            log.close()

    def _wait_port(self, host: str, port: int) -> None:
        import socket

        def open_() -> bool:
            with socket.socket() as sock:
                sock.settimeout(1)
                return sock.connect_ex((self.address(host), port)) == 0

        wait_until(
            lambda: self.net.call("client", open_), timeout=20, what=f"{host}:{port} listening"
        )

    def _own(self, path: Path) -> None:
        if self.run_as is None:
            return
        for root, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                os.chown(os.path.join(root, name), self.run_as.pw_uid, self.run_as.pw_gid)
        os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)


def _which(name: str) -> str:
    found = find_binary(name)
    if found is None:
        raise FileNotFoundError(name)
    return found


def monotonic() -> float:
    return time.monotonic()
