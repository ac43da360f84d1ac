"""A real PostgreSQL 16 for development and tests, from the binaries the ``pgserver`` wheel ships.

``pgserver`` itself only listens on a Unix socket; PgBouncer, the stack tests and anyone pointing
``psql`` at the dev database want TCP with password (SCRAM) authentication, and the outage tests
need to stop and start the server at will. So this drives ``initdb``/``pg_ctl`` directly:
127.0.0.1 only, data in a directory of the caller's choosing (``.data/postgres`` for ``make
run``), kept across runs.

PostgreSQL refuses to run as root; when we are root the server runs as an unprivileged system
user (created on first use, as ``pgserver`` does).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

SYSTEM_USER = "pgserver"
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_PASSWORD = re.compile(r"[A-Za-z0-9_\-]{8,128}")
SUPERUSER = "postgres"


def binaries_dir() -> Path:
    try:
        with warnings.catch_warnings():
            # pgserver's import asks platformdirs for a runtime dir it never uses here.
            warnings.simplefilter("ignore")
            from pgserver._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the embedded PostgreSQL needs the 'pgserver' package (uv sync installs it)"
        ) from exc
    return Path(POSTGRES_BIN_PATH)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _make_traversable(path: Path) -> None:
    """Let the unprivileged server user reach ``path`` (and read the binaries)."""
    rx = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    for parent in [path, *path.parents]:
        with contextlib.suppress(PermissionError, FileNotFoundError):
            parent.chmod(parent.stat().st_mode | rx)


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL cluster in ``data_dir`` listening on 127.0.0.1:``port``."""

    data_dir: Path
    port: int = 0
    database: str = "app"
    user: str = "app"
    password: str = ""
    # A hot standby made by ``create_replica``: read-only, so start() creates no role or database.
    standby: bool = False
    # Another installation's binaries (tests use a distribution build with OpenSSL for TLS;
    # pgserver's wheel is built without it).
    bin_dir: Path | None = None

    def __post_init__(self) -> None:
        # Names and the password are interpolated into admin SQL below; allow only safe shapes.
        for value in (self.database, self.user):
            if not _IDENTIFIER.fullmatch(value):
                raise ValueError(f"unsafe identifier: {value!r}")
        if self.password and not _PASSWORD.fullmatch(self.password):
            raise ValueError("the embedded database password must be URL-safe")
        self.data_dir = self.data_dir.resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.socket_dir = self.data_dir / "run"
        self.log_file = self.data_dir / "postgres.log"
        self._state_file = self.data_dir / "connection.env"
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._run_as = self._system_user()

    @property
    def bin(self) -> Path:
        return self.bin_dir if self.bin_dir is not None else binaries_dir()

    # --- connection details ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    @property
    def libpq_url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> EmbeddedPostgres:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._load_state()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        if not self.port:
            self.port = free_port()
        self._save_state()
        if not self.is_running():
            self._pg_ctl(
                "start",
                "-w",
                "-t",
                str(int(timeout)),
                "-l",
                str(self.log_file),
                "-o",
                f"-h 127.0.0.1 -p {self.port} -k {self.socket_dir}",
            )
        if not self.standby:
            self._ensure_database()
        return self

    def create_replica(self, data_dir: Path, *, slot: str = "replica") -> EmbeddedPostgres:
        """A streaming hot standby of this (running) server, not yet started.

        ``pg_basebackup -R`` copies the cluster and writes ``standby.signal`` and
        ``primary_conninfo`` (over this server's Unix socket, where the superuser is trusted);
        ``-C -S`` creates the physical replication slot the standby streams from, so the primary
        keeps every WAL segment the standby has not received yet, even while it is stopped.
        PostgreSQL 16's defaults (``wal_level = replica``, ten WAL senders and slots, a
        ``replication`` line in pg_hba.conf for local connections) are all this needs.
        """
        if not _IDENTIFIER.fullmatch(slot):
            raise ValueError(f"unsafe slot name: {slot!r}")
        replica = EmbeddedPostgres(
            data_dir,
            database=self.database,
            user=self.user,
            password=self.password,
            standby=True,
        )
        replica.data_dir.mkdir(parents=True, exist_ok=True)
        replica.socket_dir.mkdir(parents=True, exist_ok=True)
        if replica.pgdata.exists():
            shutil.rmtree(replica.pgdata)
        if self._run_as is not None:
            _make_traversable(replica.data_dir)
        replica._chown_tree()
        self.psql(
            f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "  # noqa: S608
            f"WHERE slot_name = '{slot}'"
        )
        result = self._run(
            [
                str(binaries_dir() / "pg_basebackup"),
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-D",
                str(replica.pgdata),
                "-R",
                "-C",
                "-S",
                slot,
                "-X",
                "stream",
                "-c",
                "fast",
            ]
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_basebackup failed: {result.stderr.strip()}")
        # The copied postmaster options name the primary's port; start() passes its own.
        (replica.pgdata / "postmaster.opts").unlink(missing_ok=True)
        return replica

    def stop(self, mode: str = "fast") -> None:
        if self.is_running():
            self._pg_ctl("stop", "-w", "-m", mode)

    def is_running(self) -> bool:
        if not (self.pgdata / "postmaster.pid").exists():
            return False
        result = self._run([str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "status"])
        return result.returncode == 0

    def psql(self, sql: str, *, database: str | None = None) -> str:
        result = self._run(
            [
                str(self.bin / "psql"),
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                database or "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-Atqc",
                sql,
            ]
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def create_database(self, name: str) -> str:
        """Create (or recreate) a database owned by the app user; returns its asyncpg URL."""
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.psql(f'CREATE DATABASE "{name}" OWNER "{self.user}"')
        return f"postgresql+asyncpg://{self.user}:{self.password}@127.0.0.1:{self.port}/{name}"

    # --- internals ------------------------------------------------------------------------------
    def _system_user(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            subprocess.run(  # noqa: S603 - fixed arguments
                [  # noqa: S607 - useradd is found on PATH like every admin tool
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    SYSTEM_USER,
                ],
                check=True,
                capture_output=True,
            )
            return pwd.getpwnam(SYSTEM_USER)

    def _run(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if self._run_as is not None:
            kwargs = {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid}
        env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8", "TZ": "UTC"}
        result: subprocess.CompletedProcess[str] = subprocess.run(  # noqa: S603 - own binaries
            args,
            capture_output=True,
            text=True,
            env=env,
            cwd=str(self.data_dir),
            check=False,
            **kwargs,  # type: ignore[call-overload]
        )
        return result

    def _pg_ctl(self, *args: str) -> None:
        result = self._run([str(self.bin / "pg_ctl"), "-D", str(self.pgdata), *args])
        if result.returncode != 0:
            log_tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise RuntimeError(f"pg_ctl {args[0]} failed: {result.stderr.strip()}\n{log_tail}")

    def _chown_tree(self) -> None:
        if self._run_as is None:
            return
        uid, gid = self._run_as.pw_uid, self._run_as.pw_gid
        for root, dirs, files in os.walk(self.data_dir):
            for name in [*dirs, *files]:
                os.chown(os.path.join(root, name), uid, gid)
        os.chown(self.data_dir, uid, gid)

    def _initdb(self) -> None:
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None:
            _make_traversable(self.data_dir)
            _make_traversable(self.bin)
            _make_traversable(self.bin.parent / "lib")
            _make_traversable(self.bin.parent / "share")
        self._chown_tree()
        result = self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                SUPERUSER,
                "--encoding=UTF8",
                "--locale=C",
                # Local socket: trust, for the admin commands here. TCP: SCRAM, like production.
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ]
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr.strip()}")
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# fastapi-app embedded defaults\n"
                "max_connections = 200\n"
                "shared_buffers = 128MB\n"
                "fsync = on\n"
                "log_min_messages = warning\n"
            )

    def _ensure_database(self) -> None:
        # Identifiers were validated in __post_init__.
        exists = self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{self.user}'")  # noqa: S608
        if exists != "1":
            self.psql(f"CREATE ROLE \"{self.user}\" LOGIN CREATEDB PASSWORD '{self.password}'")
        else:
            self.psql(f"ALTER ROLE \"{self.user}\" LOGIN CREATEDB PASSWORD '{self.password}'")
        query = f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'"  # noqa: S608
        if self.psql(query) != "1":
            self.psql(f'CREATE DATABASE "{self.database}" OWNER "{self.user}"')

    def _load_state(self) -> None:
        if not self._state_file.exists():
            return
        saved = dict(
            line.split("=", 1) for line in self._state_file.read_text().splitlines() if "=" in line
        )
        self.password = self.password or saved.get("password", "")
        self.port = self.port or int(saved.get("port", "0"))

    def _save_state(self) -> None:
        if not self.password:
            self.password = secrets.token_urlsafe(24)
        self._state_file.write_text(f"port={self.port}\npassword={self.password}\n")
        self._state_file.chmod(0o600)


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
