"""The image's own PostgreSQL 16 client tools do the backup jobs' work, as the chart runs them.

The backup and restore-drill CronJobs run the app image with its defaults (no PG_BIN_DIR: the
tools are on PATH), as UID 10001, on a read-only root with /tmp and the backup volume writable.
Here the same image backs up the session's real PostgreSQL 16 onto a bind-mounted directory and
then runs the whole restore drill from it (restore into a scratch database, row counts and
checksums, migrate, a throw-away app, smoke checks, drop). The tools' libpq is Debian's, not the
wheel's TLS-less one: `sslmode=require` must get as far as the network, and the image's pg_dump
dumps over `verify-full` with a CA made here, and refuses a wrong CA. (That server is Debian's
PostgreSQL 15, the one with OpenSSL, as in tests/integration/test_database_tls.py: a pg_dump 16
may dump an older server; only `python -m service backup` insists on equal majors.)
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from tlskit import CertificateAuthority, install_server_tls, postgres_with_openssl

from service.migrate import upgrade
from service.tools.embedded_postgres import EmbeddedPostgres
from testkit import free_port, libpq_url, skip_or_fail, wait_until

from .image_engine import Engine
from .imagekit import GATEWAY_SECRET

pytestmark = pytest.mark.image

CLIENT_MAJOR = 16  # what .docker/pg-client.txt ships; the kit's embedded server and CI's
TASKS = 120
APP_NAME = "imagebackup"


async def _server_major(url: str) -> int:
    conn = await asyncpg.connect(libpq_url(url))
    try:
        return int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def backup_database(postgres: Any) -> str:
    """A database of its own (the other image tests' rows stay out of its counts), at head,
    with rows for the dump and the drill's checksums to cover."""
    url: str = await postgres.create_database("imagebackup")
    major = await _server_major(url)
    if major != CLIENT_MAJOR:
        message = f"the test server is PostgreSQL {major}; the image's tools are {CLIENT_MAJOR}"
        skip_or_fail(message)
    await upgrade(url)
    owner = uuid.uuid4()
    conn = await asyncpg.connect(libpq_url(url))
    try:
        await conn.executemany(
            "INSERT INTO tasks (id, owner_id, title, tags) VALUES ($1, $2, $3, $4)",
            [(uuid.uuid4(), owner, f"backed up {n}", [f"t{n % 5}"]) for n in range(TASKS)],
        )
    finally:
        await conn.close()
    return url


@pytest.fixture(scope="module")
def backup_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("image-backups")
    # The container's user (10001, or a mapped one under rootless podman) writes here, as the
    # jobs write to their PVC.
    directory.chmod(0o777)
    return directory


def job_env(url: str) -> dict[str, str]:
    """What the chart gives the backup jobs: both URLs, the gateway secret (production guards),
    the volume, and nothing about the tools (the image's PATH has them)."""
    return {
        "DATABASE_URL": url,
        "DATABASE_MIGRATION_URL": url,
        "GATEWAY_SHARED_SECRET": GATEWAY_SECRET,
        "APP_NAME": APP_NAME,
        "BACKUP_DIR": "/backups",
        "BACKUP_TIMEOUT_SECONDS": "300",
        "RATE_LIMIT_ENABLED": "false",
    }


def test_the_image_carries_postgresql_16_client_tools_that_speak_tls(
    engine: Engine, image: str
) -> None:
    # A libpq built without OpenSSL refuses `sslmode=require` before it connects ("SSL support
    # is not compiled in"); one with OpenSSL tries, and meets a closed port.
    probe = f"host=127.0.0.1 port={free_port()} sslmode=require connect_timeout=5"
    script = 'for tool in pg_dump pg_restore psql; do "$tool" --version; done; psql "$PROBE" -c ""'
    result = engine.run(image, ["-c", script], entrypoint="sh", env={"PROBE": probe})
    versions = {
        match.group(1): int(match.group(2))
        for match in re.finditer(r"^(\w+) \(PostgreSQL\) (\d+)\.\d+", result.stdout, re.M)
    }
    assert versions == {"pg_dump": 16, "pg_restore": 16, "psql": 16}, result.stdout
    assert "not compiled in" not in result.stderr, result.stderr
    assert "Connection refused" in result.stderr, result.stderr


def test_backup_then_restore_drill_run_in_the_image_against_postgresql_16(
    engine: Engine, image: str, backup_database: str, backup_dir: Path
) -> None:
    env = job_env(backup_database)
    backup = engine.run(
        image, ["backup"], env=env, writable_mounts={backup_dir: "/backups"}, timeout=300
    )
    assert backup.returncode == 0, backup.stdout + backup.stderr
    assert re.search(rf"^backup {APP_NAME}-\S+: \d+ bytes, ", backup.stdout, re.M), backup.stdout
    (manifest_path,) = backup_dir.glob(f"{APP_NAME}-*.json")
    dump = manifest_path.with_suffix(".dump")
    assert dump.stat().st_size > 0
    manifest = json.loads(manifest_path.read_text())
    assert manifest["tables"]["public.tasks"]["rows"] == TASKS, manifest

    drill = engine.run(
        image,
        ["restore-drill"],
        env=env,
        writable_mounts={backup_dir: "/backups"},
        timeout=600,
    )
    output = drill.stdout + drill.stderr
    assert drill.returncode == 0, output
    assert re.search(r"^verify +\d+ tables, \d+ rows: counts and checksums match", output, re.M)
    assert re.search(r"^smoke +ok +POST /v1/tasks \(201", output, re.M), output
    assert re.search(r"^drill +passed in ", output, re.M), output
    assert asyncio.run(_drill_databases(backup_database)) == 0


async def _drill_databases(url: str) -> int:
    conn = await asyncpg.connect(libpq_url(url))
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'restore_drill_%'"
        )
        return count
    finally:
        await conn.close()


# --- TLS: the image's pg_dump over verify-full ---------------------------------------------------
@dataclass(frozen=True)
class TlsServer:
    server: EmbeddedPostgres
    certs: Path  # readable by the container's user: ca.crt and wrong-ca.crt


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    bin_dir = postgres_with_openssl()
    certs = tmp_path_factory.mktemp("image-pg-tls")
    ca = CertificateAuthority.create(certs, "ca")
    wrong = CertificateAuthority.create(certs, "wrong-ca")
    server_cert = ca.issue(certs, "server", common_name="localhost", dns=("localhost",))
    mounted = tmp_path_factory.mktemp("image-pg-tls-public")
    shutil.copyfile(ca.path, mounted / "ca.crt")
    shutil.copyfile(wrong.path, mounted / "wrong-ca.crt")
    for path in (mounted, *mounted.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    data_dir = Path(tempfile.mkdtemp(prefix="fastapi-app-image-tls-pg-"))
    server = EmbeddedPostgres(data_dir, database="app", bin_dir=bin_dir).start()
    try:
        install_server_tls(server.pgdata, server.psql, server_cert)
        wait_until(lambda: server.psql("SHOW ssl") == "on", timeout=15, what="ssl = on")
        for sql in (
            "CREATE TABLE tls_probe (id int PRIMARY KEY, note text)",
            "INSERT INTO tls_probe VALUES (1, 'dumped over verify-full')",
            f'GRANT SELECT ON tls_probe TO "{server.user}"',
        ):
            server.psql(sql, database=server.database)
        yield TlsServer(server, mounted)
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(data_dir, ignore_errors=True)


def _dump_over_tls(engine: Engine, image: str, tls: TlsServer, ca_file: str) -> Any:
    s = tls.server
    conninfo = (
        f"host=localhost port={s.port} dbname={s.database} user={s.user} "
        f"sslmode=verify-full sslrootcert=/certs/{ca_file} connect_timeout=10"
    )
    return engine.run(
        image,
        ["--format=plain", "--table=tls_probe", f"--dbname={conninfo}"],
        entrypoint="pg_dump",
        env={"PGPASSWORD": s.password or ""},
        mounts={tls.certs: "/certs"},
    )


def test_the_images_pg_dump_dumps_over_verify_full_and_refuses_a_wrong_ca(
    engine: Engine, image: str, tls_server: TlsServer
) -> None:
    good = _dump_over_tls(engine, image, tls_server, "ca.crt")
    assert good.returncode == 0, good.stderr
    assert "dumped over verify-full" in good.stdout
    wrong = _dump_over_tls(engine, image, tls_server, "wrong-ca.crt")
    assert wrong.returncode != 0
    assert "certificate verify failed" in wrong.stderr, wrong.stderr
