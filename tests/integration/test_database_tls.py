"""TLS to PostgreSQL, against a real server with ``ssl=on`` and a CA made here.

pgserver's PostgreSQL is built without OpenSSL, so the server is the distribution's
(``postgresql`` from apt; .ci/run installs it), run by the same ``EmbeddedPostgres`` driver.
Its certificate names ``localhost`` only, so ``127.0.0.1`` is the wrong host name.

What must hold: verify-full connects, encrypted; a wrong CA or a wrong host name is refused,
readiness answers 503 and one clear error line says which; a client that requires TLS refuses a
server without it; a server that requires TLS refuses a plaintext client; client certificates
work; ``migrate`` and ``backup`` use the same TLS settings; PgBouncer's server side verifies too.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from tlskit import CertificateAuthority, Issued, install_server_tls, postgres_with_openssl

from service.backup.pgtools import PgTools
from service.backup.store import DirectoryStore
from service.backup.take import take_backup
from service.db import Database
from service.dbtls import TlsFiles, asyncpg_ssl
from service.entrypoints.cli import main
from service.migrate import upgrade
from service.settings import Settings, normalise_database_url
from service.tools.embedded_postgres import EmbeddedPostgres
from testkit import free_port, libpq_url, load_module, port_open, wait_until

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TlsPostgres:
    server: EmbeddedPostgres
    bin_dir: Path
    ca: Path
    wrong_ca: Path
    client: Issued

    def url(self, mode: str, *, host: str = "localhost", user: str | None = None) -> str:
        s = self.server
        credentials = f"{user}" if user else f"{s.user}:{s.password}"
        return f"postgresql://{credentials}@{host}:{s.port}/{s.database}?sslmode={mode}"


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsPostgres]:
    bin_dir = postgres_with_openssl()
    certs = tmp_path_factory.mktemp("pg-tls")
    ca = CertificateAuthority.create(certs, "test-ca")
    wrong = CertificateAuthority.create(certs, "wrong-ca")
    server_cert = ca.issue(certs, "server", common_name="localhost", dns=("localhost",))
    client = ca.issue(certs, "client", common_name="certuser", client=True)
    data_dir = Path(tempfile.mkdtemp(prefix="fastapi-app-tls-pg-"))
    server = EmbeddedPostgres(data_dir, database="app", bin_dir=bin_dir).start()
    try:
        hba = server.pgdata / "pg_hba.conf"
        hba.write_text(
            "hostnossl all tls_only 127.0.0.1/32 reject\n"
            "hostssl all certuser 127.0.0.1/32 cert\n" + hba.read_text()
        )
        install_server_tls(server.pgdata, server.psql, server_cert, client_ca=ca.path)
        wait_until(lambda: server.psql("SHOW ssl") == "on", timeout=15, what="ssl = on")
        server.psql("CREATE ROLE certuser LOGIN")
        server.psql("CREATE ROLE tls_only LOGIN PASSWORD 'tls-only-password'")
        tls = TlsPostgres(server, bin_dir, ca.path, wrong.path, client)
        asyncio.run(upgrade(normalise_database_url(tls.url("verify-full")), tls=TlsFiles(ca.path)))
        yield tls
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(data_dir, ignore_errors=True)


def json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


async def test_verify_full_connects_encrypted_and_the_app_is_ready(
    tls_pg: TlsPostgres, make_settings: Callable[..., Settings], app_client: Any
) -> None:
    settings = make_settings(
        database_url=tls_pg.url("verify-full"), database_ssl_root_cert=tls_pg.ca
    )
    database = Database(settings)
    try:
        async with database.engine.connect() as conn:
            encrypted = (
                await conn.exec_driver_sql(
                    "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                )
            ).one()
    finally:
        await database.dispose()
    assert encrypted.ssl is True
    assert encrypted.version.startswith("TLSv1.")
    async with app_client(settings) as client:
        assert (await client.get("/health/ready")).status_code == 200


async def test_verify_ca_does_not_check_the_host_name(
    tls_pg: TlsPostgres, make_settings: Callable[..., Settings], app_client: Any
) -> None:
    settings = make_settings(
        database_url=tls_pg.url("verify-ca", host="127.0.0.1"), database_ssl_root_cert=tls_pg.ca
    )
    async with app_client(settings) as client:
        assert (await client.get("/health/ready")).status_code == 200


@pytest.mark.parametrize(
    ("mode", "host", "ca", "reason"),
    [
        (
            "verify-full",
            "localhost",
            "wrong",
            "certificate verify failed: self-signed certificate",
        ),
        ("verify-full", "127.0.0.1", "right", "certificate verify failed: IP address mismatch"),
        ("verify-ca", "localhost", "wrong", "certificate verify failed"),
    ],
)
async def test_a_wrong_ca_or_host_name_is_refused_with_one_clear_error(
    tls_pg: TlsPostgres,
    make_settings: Callable[..., Settings],
    app_client: Any,
    capsys: pytest.CaptureFixture[str],
    mode: str,
    host: str,
    ca: str,
    reason: str,
) -> None:
    settings = make_settings(
        database_url=tls_pg.url(mode, host=host),
        database_ssl_root_cert=tls_pg.ca if ca == "right" else tls_pg.wrong_ca,
        log_format="json",
        database_connect_retry_attempts=1,
    )
    capsys.readouterr()
    async with app_client(settings) as client:
        for _ in range(3):
            ready = await client.get("/health/ready")
            assert ready.status_code == 503
            assert ready.json()["detail"] == "The database does not answer"
    errors = [line for line in json_lines(capsys.readouterr().out) if line["level"] == "error"]
    assert [line["event"] for line in errors] == ["database_tls_failed"], errors
    assert errors[0]["reason"].startswith(reason), errors[0]


async def test_a_client_requiring_tls_refuses_a_server_without_it(
    database_url: str,
    make_settings: Callable[..., Settings],
    app_client: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The session's PostgreSQL (pgserver) has no TLS at all.
    settings = make_settings(database_url=database_url + "?sslmode=require", log_format="json")
    capsys.readouterr()
    async with app_client(settings) as client:
        assert (await client.get("/health/ready")).status_code == 503
    (line,) = [e for e in json_lines(capsys.readouterr().out) if e["level"] == "error"]
    assert line["reason"] == "the server does not offer TLS, and the URL requires it"


async def test_a_server_requiring_tls_refuses_a_plaintext_client(tls_pg: TlsPostgres) -> None:
    s = tls_pg.server
    plain = f"postgresql://tls_only:tls-only-password@127.0.0.1:{s.port}/{s.database}"
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(plain, ssl=False)
    url, context = asyncpg_ssl(plain + "?sslmode=verify-ca", TlsFiles(tls_pg.ca))
    conn = await asyncpg.connect(url, ssl=context)
    await conn.close()


async def test_a_client_certificate_authenticates(
    tls_pg: TlsPostgres, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(
        database_url=tls_pg.url("verify-full", user="certuser"),
        database_ssl_root_cert=tls_pg.ca,
        database_ssl_cert=tls_pg.client.cert,
        database_ssl_key=tls_pg.client.key,
    )
    database = Database(settings)
    try:
        async with database.engine.connect() as conn:
            user = (await conn.exec_driver_sql("SELECT current_user")).scalar_one()
    finally:
        await database.dispose()
    assert user == "certuser"


async def test_migrate_with_a_wrong_ca_fails_at_once_with_one_line(
    tls_pg: TlsPostgres, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ENVIRONMENT", "test")
    monkeypatch.setenv("DATABASE_URL", tls_pg.url("verify-full"))
    monkeypatch.setenv("DATABASE_SSL_ROOT_CERT", str(tls_pg.wrong_ca))
    assert await asyncio.to_thread(main, ["migrate"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: TLS to the database failed: certificate verify failed: self-signed certificate "
        "in certificate chain"
    ]


async def test_migrate_and_backup_over_verify_full(
    tls_pg: TlsPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENVIRONMENT", "test")
    monkeypatch.setenv("DATABASE_URL", tls_pg.url("verify-full"))
    monkeypatch.setenv("DATABASE_SSL_ROOT_CERT", str(tls_pg.ca))
    assert await asyncio.to_thread(main, ["migrate"]) == 0
    result = await take_backup(
        url=tls_pg.url("verify-full"),
        tls=TlsFiles(tls_pg.ca),
        store=DirectoryStore(tmp_path, "tls"),
        tools=PgTools(tls_pg.bin_dir),
        timeout_s=120,
        keep_daily=1,
        keep_weekly=0,
    )
    assert result.size_bytes > 0
    assert "public.tasks" in result.backup.manifest()["tables"]


# --- PgBouncer's server side ----------------------------------------------------------------------

render = load_module(ROOT / "pgbouncer" / "render.py", "pgbouncer_render_tls")


def _pgbouncer(tls_pg: TlsPostgres, out: Path, ca: Path) -> tuple[subprocess.Popen[bytes], Any]:
    from testkit import require_binary

    binary = require_binary("pgbouncer")
    upstream = render.Upstream.from_url(tls_pg.url("verify-full"), alias="app")
    shutil.copyfile(ca, out / "server-ca.crt")
    rendered = render.render(
        out,
        upstream,
        listen_port=free_port(),
        overrides={
            "server_tls_sslmode": "verify-full",
            "server_tls_ca_file": str(out / "server-ca.crt"),
            "server_login_retry": "1",
            # A client waiting for a server connection that cannot be made is told so quickly.
            "query_wait_timeout": "3",
        },
    )
    kwargs: dict[str, Any] = {}
    if os.geteuid() == 0:
        owner = tls_pg.server.pgdata.stat()  # the unprivileged user the server runs as
        subprocess.run(["chown", "-R", f"{owner.st_uid}:{owner.st_gid}", str(out)], check=True)
        kwargs = {"user": owner.st_uid, "group": owner.st_gid, "extra_groups": []}
    process = subprocess.Popen(
        [binary, str(rendered.ini)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        **kwargs,
    )
    wait_until(
        lambda: process.poll() is not None or port_open(rendered.listen_port),
        timeout=15,
        what="pgbouncer listening",
    )
    assert process.poll() is None, "pgbouncer exited"
    return process, rendered


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.mark.stack
@pytest.mark.parametrize("ca", ["right", "wrong"])
async def test_pgbouncer_verifies_the_server_certificate(tls_pg: TlsPostgres, ca: str) -> None:
    out = Path(tempfile.mkdtemp(prefix="fastapi-pgbouncer-tls-", dir="/tmp"))
    out.chmod(0o755)
    process, rendered = _pgbouncer(tls_pg, out, tls_pg.ca if ca == "right" else tls_pg.wrong_ca)
    try:
        client_url = str(rendered.client_url(tls_pg.server.user, tls_pg.server.password))
        client_url = libpq_url(client_url)
        if ca == "wrong":
            with pytest.raises(asyncpg.PostgresError):
                conn = await asyncpg.connect(client_url, ssl=False, timeout=30)
                try:
                    await conn.fetchval("SELECT 1", timeout=30)
                finally:
                    await conn.close()
            log = (out / "pgbouncer.log").read_text(errors="replace")
            assert "certificate verify failed" in log or "TLS handshake" in log, log[-2000:]
            return
        conn = await asyncpg.connect(client_url, ssl=False, statement_cache_size=0)
        try:
            row = await conn.fetchrow(
                "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            )
        finally:
            await conn.close()
        assert row is not None
        assert row["ssl"] is True
    finally:
        _stop(process)
        shutil.rmtree(out, ignore_errors=True)
