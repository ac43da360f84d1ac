"""pgbouncer/: the shipped pgbouncer.ini, its sizing arithmetic, and the real PgBouncer.

The stack tests run Debian's pgbouncer (as an unprivileged user: it refuses root) with the
configuration render.py derives from the shipped ini, in front of the session's real
PostgreSQL, and push concurrent asyncpg clients and the app's own engine (in
``pgbouncer-transaction`` mode) through it.
"""

from __future__ import annotations

import asyncio
import configparser
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from testkit import (
    free_port,
    load_module,
    port_open,
    require_binary,
    skip_or_fail,
    wait_until,
)
from tools.kit import drop_to, find_pgbouncer, unprivileged_user
from tools.pgbouncer_admin import show

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
PGBOUNCER_DIR = ROOT / "pgbouncer"
SHIPPED = PGBOUNCER_DIR / "pgbouncer.ini"
RUN_AS = "fastapi-pgbouncer"


render = load_module(PGBOUNCER_DIR / "render.py", "pgbouncer_render")


def pgbouncer_binary() -> str:
    return require_binary("pgbouncer", hint="apt-get install pgbouncer")


@pytest.fixture(scope="module")
def shipped() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=(";", "#"))
    parser.read_string(SHIPPED.read_text())
    return parser


# --- the shipped file --------------------------------------------------------------------------
def test_shipped_ini_is_transaction_pooling_with_scram(shipped: configparser.ConfigParser) -> None:
    section = shipped["pgbouncer"]
    assert section["pool_mode"] == "transaction"
    assert section["auth_type"] == "scram-sha-256"
    assert section["auth_user"]
    assert "$1" in section["auth_query"]
    assert section["auth_file"].startswith("/")
    assert section["admin_users"]
    assert section["stats_users"]
    assert section["server_reset_query"] == "DISCARD ALL"
    assert section["server_check_query"]
    for key in (
        "query_wait_timeout",
        "server_connect_timeout",
        "client_idle_timeout",
        "idle_transaction_timeout",
        "query_timeout",
        "server_idle_timeout",
        "server_lifetime",
    ):
        assert int(section[key]) > 0, key
    ignored = {item.strip() for item in section["ignore_startup_parameters"].split(",")}
    assert "extra_float_digits" in ignored
    assert not ignored & {"options", "statement_timeout"}, "would be dropped silently"
    assert list(shipped["databases"]), "a [databases] entry to adapt"


def test_shipped_ini_documents_what_it_must() -> None:
    text = SHIPPED.read_text()
    assert "DATABASE_MIGRATION_URL" in text, "migrations bypass PgBouncer"
    assert "pgbouncer-transaction" in text
    assert "pgbouncer-prepared" in text
    assert "max_prepared_statements" in text
    assert "1.21" in text
    assert "only" in text.split("server_reset_query =")[0].rsplit(";; ---", 1)[-1]
    assert "CREATE FUNCTION pgbouncer.get_auth" in text
    active = [line for line in text.splitlines() if line.startswith("max_prepared_statements")]
    assert not active, "Debian's PgBouncer 1.18 refuses the key; keep it commented"


def test_sizing_arithmetic_holds(shipped: configparser.ConfigParser) -> None:
    """pods x workers x (pool + overflow) x engines x surge <= max_client_conn, and the server
    side fits in PostgreSQL's max_connections minus the reserve."""
    match = re.search(r"^;; sizing: (.+)$", SHIPPED.read_text(), re.MULTILINE)
    assert match, "the machine-readable sizing line"
    sizing = {key: float(value) for key, value in (i.split("=") for i in match[1].split())}
    section = shipped["pgbouncer"]
    clients = (
        sizing["app_pods"]
        * sizing["workers_per_pod"]
        * (sizing["pool_size"] + sizing["max_overflow"])
        * sizing["engines"]
        * sizing["surge"]
    )
    assert clients <= int(section["max_client_conn"])
    servers = sizing["pgbouncer_replicas"] * int(section["max_db_connections"])
    assert servers <= sizing["postgres_max_connections"] - sizing["postgres_reserved"]
    per_pool = int(section["default_pool_size"]) + int(section["reserve_pool_size"])
    assert per_pool <= int(section["max_db_connections"])
    assert int(section["min_pool_size"]) <= int(section["default_pool_size"])
    # The example uses the app's real defaults (contract: SQLALCHEMY_POOL_SIZE 10, OVERFLOW 0).
    from service.settings import Settings

    assert Settings.model_fields["sqlalchemy_pool_size"].default == sizing["pool_size"]
    assert Settings.model_fields["sqlalchemy_pool_overflow"].default == sizing["max_overflow"]


def test_render_writes_a_local_runnable_copy() -> None:
    out = Path(tempfile.mkdtemp(prefix="fastapi-pgb-", dir="/tmp"))
    try:
        upstream = render.Upstream.from_url(
            "postgresql+asyncpg://app:s3cret-pw@127.0.0.1:5433/app_db", alias="app"
        )
        rendered = render.render(out, upstream, listen_port=16432)
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(rendered.ini)
        section = parser["pgbouncer"]
        shipped = render.read_shipped()["pgbouncer"]
        for key in ("pool_mode", "auth_type", "default_pool_size", "query_wait_timeout"):
            assert section[key] == shipped[key], "pool settings come from the shipped file"
        assert section["listen_addr"] == "127.0.0.1"
        assert section["pidfile"] == str(out / "pgbouncer.pid")
        assert section["unix_socket_dir"] == str(out)
        assert "auth_query" not in section
        assert parser["databases"]["app"] == "host=127.0.0.1 port=5433 dbname=app_db"
        assert rendered.userlist.stat().st_mode & 0o777 == 0o600
        assert '"app" "s3cret-pw"' in rendered.userlist.read_text()
        assert rendered.client_url("app", "pw") == "postgresql://app:pw@127.0.0.1:16432/app"
        with pytest.raises(render.RenderError):
            render.render(out, upstream, listen_port=1, overrides={"pool_mode": "x\n[evil]"})
        bad = render.Upstream("127.0.0.1", 5432, "app", "app", 'pw" "x')
        with pytest.raises(render.RenderError):
            render.render(out, bad, listen_port=16432)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_render_fronts_a_replica_under_its_own_name() -> None:
    out = Path(tempfile.mkdtemp(prefix="fastapi-pgb-", dir="/tmp"))
    try:
        upstream = render.Upstream.from_url("postgresql://app:pw-1234@127.0.0.1:5433/app")
        replica = render.Upstream.from_url(
            "postgresql://app:pw-1234@127.0.0.1:5434/app", alias="app_replica"
        )
        rendered = render.render(out, upstream, listen_port=16432, replica=replica)
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(rendered.ini)
        assert parser["databases"]["app"] == "host=127.0.0.1 port=5433 dbname=app"
        assert parser["databases"]["app_replica"] == "host=127.0.0.1 port=5434 dbname=app"
        assert rendered.replica_database == "app_replica"
        url = rendered.client_url("app", "pw", database=rendered.replica_database)
        assert url == "postgresql://app:pw@127.0.0.1:16432/app_replica"
        same_name = render.Upstream.from_url("postgresql://app:pw-1234@127.0.0.1:5434/app")
        with pytest.raises(render.RenderError, match="name"):
            render.render(out, upstream, listen_port=16432, replica=same_name)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_installed_pgbouncer_version_note() -> None:
    version = render.installed_version(pgbouncer_binary())
    assert version is not None
    assert version >= (1, 14, 0), "scram-sha-256 with auth_query needs PgBouncer >= 1.14"


# --- the real thing ------------------------------------------------------------------------------
@dataclass
class Bouncer:
    rendered: Any
    user: str
    password: str
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return str(self.rendered.client_url(self.user, self.password))

    def log(self) -> str:
        path = self.rendered.directory / "pgbouncer.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def console(self, command: str) -> list[dict[str, str]]:
        """Run a SHOW command on the admin console."""
        rendered = self.rendered
        return show(rendered.listen_port, rendered.admin_user, rendered.admin_password, command)


@pytest.fixture
def bouncer(database_url: str) -> Iterator[Bouncer]:
    """Debian's PgBouncer (1.18) as the shipped ini configures it."""
    yield from _bouncer(database_url, pgbouncer_binary(), prepared_statements=False)


@pytest.fixture
def prepared_bouncer(database_url: str) -> Iterator[Bouncer]:
    """A PgBouncer that tracks prepared statements (>= 1.21: ``make pgbouncer``'s build)."""
    binary = find_pgbouncer(prepared_statements=True)
    if binary is None:
        skip_or_fail("PgBouncer >= 1.21 is not installed (make pgbouncer builds one)")
    yield from _bouncer(database_url, binary, prepared_statements=True)


def _bouncer(database_url: str, binary: str, *, prepared_statements: bool) -> Iterator[Bouncer]:
    upstream = render.Upstream.from_url(database_url, alias="app")
    out = Path(tempfile.mkdtemp(prefix="fastapi-pgbouncer-", dir="/tmp"))
    out.chmod(0o755)
    rendered = render.render(
        out,
        upstream,
        listen_port=free_port(),
        # Small pool so 50 clients must share it, as they would in production.
        overrides={"default_pool_size": "5", "reserve_pool_size": "2", "min_pool_size": "0"},
        prepared_statements=prepared_statements,
    )
    # PgBouncer refuses to run as root: an unprivileged system user when we are root.
    as_user = drop_to(unprivileged_user(RUN_AS))
    if as_user:
        subprocess.run(
            ["chown", "-R", f"{as_user['user']}:{as_user['group']}", str(out)], check=True
        )
    process = subprocess.Popen(
        [binary, str(rendered.ini)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        **as_user,
    )
    server = Bouncer(rendered, upstream.user, upstream.password, process)
    try:
        wait_until(
            lambda: process.poll() is not None or port_open(rendered.listen_port),
            timeout=15,
            what=f"pgbouncer listening\n{server.log()}",
        )
        assert process.poll() is None, f"pgbouncer exited:\n{server.log()}"
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # safe shutdown: waits for clients to finish
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.stack
async def test_concurrent_asyncpg_clients_share_a_small_transaction_pool(
    bouncer: Bouncer,
) -> None:
    async def one(number: int) -> tuple[int, int]:
        connection = await asyncpg.connect(bouncer.url, statement_cache_size=0, timeout=10)
        try:
            async with connection.transaction():
                backend = await connection.fetchval("SELECT pg_backend_pid()")
                await connection.execute("SELECT pg_sleep(0.05)")
                doubled = await connection.fetchval("SELECT $1::int * 2", number)
                # Same transaction, same server connection.
                assert await connection.fetchval("SELECT pg_backend_pid()") == backend
            return backend, doubled
        finally:
            await connection.close()

    results = await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(50))), 60)
    assert [doubled for _, doubled in results] == [n * 2 for n in range(50)]
    backends = {backend for backend, _ in results}
    assert 1 <= len(backends) <= 5 + 2, f"50 clients on {len(backends)} server connections"

    pools = bouncer.console("SHOW POOLS")
    ours = [row for row in pools if row["database"] == "app"]
    assert ours, pools
    assert {row["pool_mode"] for row in ours} == {"transaction"}
    config = {row["key"]: row["value"] for row in bouncer.console("SHOW CONFIG")}
    assert config["pool_mode"] == "transaction"
    assert config["auth_type"] == "scram-sha-256"


@pytest.mark.stack
async def test_wrong_password_is_refused(bouncer: Bouncer) -> None:
    wrong = bouncer.rendered.client_url(bouncer.user, "not-the-password")
    # PgBouncer answers a failed SCRAM exchange with an error asyncpg reports as a protocol
    # violation; PostgreSQL itself would say InvalidPassword.
    refused = (
        asyncpg.InvalidPasswordError,
        asyncpg.InvalidAuthorizationSpecificationError,
        asyncpg.ProtocolViolationError,
    )
    with pytest.raises(refused, match=r"(?i)password|SASL|authentication"):
        await asyncpg.connect(wrong, timeout=10)


@pytest.mark.stack
async def test_app_engine_in_pgbouncer_transaction_mode(bouncer: Bouncer) -> None:
    """The app's own engine options (no statement caches, unique statement names) under
    concurrent load through transaction pooling: no 'prepared statement already exists'."""
    from sqlalchemy import text

    from service.db import Database
    from service.settings import load_settings

    settings = load_settings(
        environment="test",
        database_url=bouncer.rendered.client_url(
            bouncer.user, bouncer.password, scheme="postgresql+asyncpg"
        ),
        database_pool_mode="pgbouncer-transaction",
        sqlalchemy_pool_size=5,
        sqlalchemy_pool_overflow=5,
        log_level="WARNING",
    )
    database = Database(settings)
    try:

        async def one(number: int) -> int:
            async for session in database.session():
                await session.execute(text("SELECT pg_sleep(0.02)"))
                value = await session.scalar(text("SELECT CAST(:n AS int) + 1"), {"n": number})
                return int(value)
            raise AssertionError("no session")

        for _round in range(3):
            results = await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(50))), 60)
            assert results == [n + 1 for n in range(50)]
    finally:
        await database.dispose()
    stats = bouncer.console("SHOW STATS")
    app_stats = next(row for row in stats if row["database"] == "app")
    assert int(app_stats["total_xact_count"]) >= 150


@pytest.mark.stack
async def test_app_keeps_its_statement_caches_in_pgbouncer_prepared_mode(
    prepared_bouncer: Bouncer,
) -> None:
    """pgbouncer-prepared through a PgBouncer that tracks prepared statements: 50 concurrent
    callers on 10 app connections and 5 (+2) server connections get the right answers (no
    "prepared statement does not exist" when a statement prepared on one server connection is
    executed on another), and each statement is parsed once per app connection, not once per
    execution: the app's caches work through PgBouncer."""
    from sqlalchemy import Integer, bindparam, func, literal_column, select

    from service.db import Database, DriverQuery, ReadConnection
    from service.settings import load_settings

    plus_one = DriverQuery.compile(select(bindparam("n", type_=Integer) + literal_column("1")))
    # The request path's writes are prebuilt statements (service/write_connection.py).
    SLEEP = select(func.pg_sleep(0.005))  # noqa: N806
    DOUBLE = select(bindparam("n", type_=Integer) * literal_column("2"))  # noqa: N806
    pool_size = 10
    settings = load_settings(
        environment="test",
        database_url=prepared_bouncer.rendered.client_url(
            prepared_bouncer.user, prepared_bouncer.password, scheme="postgresql+asyncpg"
        ),
        database_pool_mode="pgbouncer-prepared",
        sqlalchemy_pool_size=pool_size,
        sqlalchemy_pool_overflow=0,
        log_level="WARNING",
    )
    database = Database(settings)
    rounds, callers = 6, 50
    try:

        async def read(number: int) -> int:
            async def work(connection: ReadConnection) -> int:
                return int((await connection.fetchrow(plus_one, {"n": number}))[0])

            return await database.read(work)

        async def write(number: int) -> int:
            async with database.transaction() as connection:
                await connection.execute(SLEEP)
                value = await connection.scalar(DOUBLE, {"n": number})
            return int(value)

        for _round in range(rounds):
            reads = asyncio.gather(*(read(n) for n in range(callers)))
            writes = asyncio.gather(*(write(n) for n in range(callers)))
            read_answers, write_answers = await asyncio.wait_for(asyncio.gather(reads, writes), 60)
            assert read_answers == [n + 1 for n in range(callers)]
            assert write_answers == [n * 2 for n in range(callers)]
    finally:
        await database.dispose()
    stats = prepared_bouncer.console("SHOW STATS")
    app_stats = next(row for row in stats if row["database"] == "app")
    executions = int(app_stats["total_bind_count"])
    assert executions >= rounds * callers * 3, app_stats
    # Per connection: the dialect's four set-up queries and the test's three statements, once.
    # Without the caches every execution would be parsed (the pgbouncer-transaction mode).
    assert int(app_stats["total_client_parse_count"]) <= pool_size * 7, app_stats
    # PgBouncer prepares each statement once per server connection (5 + 2 reserve) it runs on.
    assert int(app_stats["total_server_parse_count"]) <= (5 + 2) * 7, app_stats
