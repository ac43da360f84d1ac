"""``python -m service restore-drill``: prove the latest backup restores into a working service.

1. The latest complete backup's dump is checked against its manifest (size, sha256) and its
   archive table of contents is read (``pg_restore --list``).
2. It is restored into a scratch database (``pg_restore --exit-on-error --single-transaction``).
3. Every table's row count and checksum is compared with what the backup recorded, before
   anything else touches the data.
4. ``migrate`` runs on it (a no-op at head; the upgrade path when the backup is older).
5. A throw-away app process (``python -m service serve``: gunicorn, one worker, loopback only)
   is started on it and the ``smoke`` checks run against it with a key minted for the drill.
6. The app is stopped and the scratch database dropped, whatever happened.

Any failed step stops the drill with one line naming the step, a non-zero exit code, and no
metric pushed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TypeVar

from pydantic import SecretStr
from sqlalchemy.engine import make_url

from service.backup.fingerprint import (
    TableFingerprint,
    connect,
    fingerprints,
    quote_ident,
)
from service.backup.pgtools import BackupError, Connection, PgTools, last_error_line
from service.backup.store import DirectoryStore, StoredBackup
from service.backup.take import sha256_of
from service.dbtls import TlsFiles
from service.settings import Settings

Say = Callable[[str], None]
T = TypeVar("T")


@dataclass(frozen=True)
class DrillResult:
    backup: StoredBackup
    duration_s: float
    backup_age_s: float
    tables: int
    rows: int


class DrillFailedError(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step


def compare_fingerprints(
    recorded: dict[str, dict[str, object]], restored: dict[str, TableFingerprint]
) -> list[str]:
    """Differences between what the backup recorded and what the restore holds."""
    problems = []
    for table in sorted(set(recorded) | set(restored)):
        if table not in restored:
            problems.append(f"{table}: missing after restore")
        elif table not in recorded:
            problems.append(f"{table}: not in the backup's manifest")
        else:
            want, got = recorded[table], restored[table]
            if int(str(want["rows"])) != got.rows:
                problems.append(f"{table}: {got.rows} rows, the backup recorded {want['rows']}")
            elif str(want["checksum"]) != got.checksum:
                problems.append(f"{table}: checksum differs from the backup's")
    return problems


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RestoreDrill:
    settings: Settings
    store: DirectoryStore
    tools: PgTools
    say: Say = print
    app_start_timeout_s: float = 90.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def tls(self) -> TlsFiles:
        return self.settings.tls_files()

    def run(self) -> DrillResult:
        started = time.monotonic()
        backup = self._step("find", self.store.latest)
        manifest = backup.manifest()
        self.say(
            f"backup   {backup.name} ({manifest['dump']['size_bytes']} bytes, "
            f"taken {manifest['created_at']})"
        )
        self._step("verify archive", lambda: self._verify_archive(backup, manifest))
        admin_url = self.settings.drill_admin_url()
        scratch = f"restore_drill_{datetime.now(UTC):%Y%m%d%H%M%S}_{uuid.uuid4().hex[:6]}"
        scratch_url = (
            make_url(admin_url).set(database=scratch).render_as_string(hide_password=False)
        )
        asyncio.run(self._create_database(admin_url, scratch))
        self.say(f"scratch  database {scratch} created")
        try:
            self._step("restore", lambda: self._restore(backup, scratch_url))
            tables, rows = self._step(
                "verify rows", lambda: asyncio.run(self._verify_rows(scratch_url, manifest))
            )
            self.say(f"verify   {tables} tables, {rows} rows: counts and checksums match")
            self._step("migrate", lambda: self._migrate(scratch_url))
            self._step("smoke", lambda: self._smoke(scratch_url))
        finally:
            asyncio.run(self._drop_database(admin_url, scratch))
            self.say(f"cleanup  database {scratch} dropped")
        duration = time.monotonic() - started
        age = (datetime.now(UTC) - backup.created_at).total_seconds()
        steps = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.timings.items())
        self.say(f"drill    passed in {duration:.1f} s ({steps}); backup age {age / 3600:.1f} h")
        return DrillResult(backup, duration, age, tables, rows)

    def _step(self, name: str, action: Callable[[], T]) -> T:
        started = time.monotonic()
        try:
            return action()
        except DrillFailedError:
            raise
        except BackupError as exc:
            raise DrillFailedError(name, str(exc)) from None
        finally:
            self.timings[name] = time.monotonic() - started

    # --- steps --------------------------------------------------------------------------------
    def _verify_archive(self, backup: StoredBackup, manifest: dict[str, object]) -> None:
        dump = manifest["dump"]
        assert isinstance(dump, dict)
        if not backup.dump.is_file():
            raise BackupError(f"{backup.dump.name} is missing")
        size = backup.dump.stat().st_size
        if size != dump["size_bytes"]:
            raise BackupError(
                f"{backup.dump.name} is {size} bytes, the manifest says {dump['size_bytes']} "
                "(truncated?)"
            )
        if sha256_of(backup.dump) != dump["sha256"]:
            raise BackupError(f"{backup.dump.name}: sha256 differs from the manifest (corrupt)")
        listing = self.tools.run(
            "pg_restore",
            ["--list", str(backup.dump)],
            Connection("", None, ""),
            timeout=self.settings.backup_timeout_seconds,
        )
        if listing.returncode != 0:
            raise BackupError(f"pg_restore --list: {last_error_line(listing)}")
        self.say(
            f"archive  size and sha256 match the manifest; {len(listing.stdout.splitlines())} "
            "archive entries"
        )

    def _restore(self, backup: StoredBackup, scratch_url: str) -> None:
        target = Connection.from_url(scratch_url, self.tls)
        started = time.monotonic()
        result = self.tools.run(
            "pg_restore",
            [
                "--exit-on-error",
                "--single-transaction",
                "--no-owner",
                "--no-privileges",
                "--no-password",
                f"--dbname={target.conninfo}",
                str(backup.dump),
            ],
            target,
            timeout=self.settings.backup_timeout_seconds,
        )
        if result.returncode != 0:
            raise BackupError(f"pg_restore failed: {last_error_line(result)}")
        self.say(f"restore  done in {time.monotonic() - started:.1f} s")

    async def _verify_rows(self, scratch_url: str, manifest: dict[str, object]) -> tuple[int, int]:
        recorded = manifest["tables"]
        assert isinstance(recorded, dict)
        connection = await connect(scratch_url, self.tls)
        try:
            restored = await fingerprints(connection)
        finally:
            await connection.close()
        problems = compare_fingerprints(recorded, restored)
        if problems:
            raise BackupError("; ".join(problems[:5]))
        return len(restored), sum(fp.rows for fp in restored.values())

    def _migrate(self, scratch_url: str) -> None:
        from service.migrate import upgrade

        before, after = asyncio.run(upgrade(scratch_url, tls=self.tls))
        shown = ",".join(sorted(before)) or "empty"
        self.say(f"migrate  {shown} -> {','.join(sorted(after))}")

    def _smoke(self, scratch_url: str) -> None:
        from service.tools.smoke import SmokeCheck, SmokeFailedError

        api_key = asyncio.run(self._mint_key(scratch_url))
        headers = {}
        secret = self.settings.gateway_shared_secret
        if secret is not None:
            headers[self.settings.gateway_secret_header] = secret.get_secret_value()
        port = _free_port()
        with self._throwaway_app(scratch_url, port) as log:
            try:
                SmokeCheck(
                    url=f"http://127.0.0.1:{port}",
                    api_key=api_key,
                    extra_headers=headers,
                    ready_timeout=self.app_start_timeout_s,
                    say=lambda line: self.say(f"smoke    {line}"),
                ).run()
            except SmokeFailedError as failure:
                log.seek(0)
                tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
                raise BackupError(f"{failure} (app log: {' | '.join(tail)})") from None

    async def _create_database(self, admin_url: str, name: str) -> None:
        await self._admin(admin_url, f"CREATE DATABASE {quote_ident(name)}")

    async def _drop_database(self, admin_url: str, name: str) -> None:
        await self._admin(admin_url, f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")

    async def _admin(self, admin_url: str, statement: str) -> None:
        connection = await connect(admin_url, self.tls)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    async def _mint_key(self, scratch_url: str) -> str:
        from service.db import Database
        from service.security.api_keys import ApiKeyRepository

        settings = self.settings.model_copy(
            update={"database_url": SecretStr(scratch_url), "database_read_url": None}
        )
        database = Database(settings)
        try:
            async for session in database.session():
                plaintext, _ = await ApiKeyRepository(session).create(
                    owner_id=uuid.uuid4(),
                    scopes=["tasks:read", "tasks:write"],
                    name="restore-drill",
                )
        finally:
            await database.dispose()
        return plaintext

    @contextmanager
    def _throwaway_app(self, scratch_url: str, port: int) -> Iterator[IO[bytes]]:
        with tempfile.TemporaryDirectory(prefix="restore-drill-") as workdir:
            env = {
                **os.environ,
                "DATABASE_URL": scratch_url,
                "DATABASE_READ_URL": "",
                "DATABASE_MIGRATION_URL": "",
                "RESTORE_DRILL_DATABASE_URL": "",
                "DATABASE_POOL_MODE": "direct",
                "HOST": "127.0.0.1",
                "PORT": str(port),
                "METRICS_PORT": "0",
                "WEB_CONCURRENCY": "1",
                "RATE_LIMIT_ENABLED": "false",
                "REDIS_URL": "",
                "SENTRY_DSN": "",
                "PROMETHEUS_MULTIPROC_DIR": str(Path(workdir) / "metrics"),
            }
            with open(Path(workdir) / "app.log", "w+b") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "service", "serve"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                try:
                    yield log
                finally:
                    _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
