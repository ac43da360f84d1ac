"""``python -m service backup``: one consistent pg_dump, its manifest, then retention.

Consistency: a REPEATABLE READ transaction exports its snapshot, the row counts and checksums
are computed in that transaction, and pg_dump dumps ``--snapshot`` of it, so the manifest
describes exactly the rows in the dump, and every write committed before the snapshot was taken
is in both. The transaction stays open (read-only, holding no locks a writer waits for) until
pg_dump has finished.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.backup.fingerprint import connect, fingerprints, server_major
from service.backup.pgtools import BackupError, Connection, PgTools, last_error_line
from service.backup.store import PARTIAL_SUFFIX, DirectoryStore, StoredBackup, prune
from service.dbtls import TlsFiles

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class BackupResult:
    backup: StoredBackup
    size_bytes: int
    duration_s: float
    tables: int
    rows: int
    pruned: list[StoredBackup]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


async def take_backup(
    *,
    url: str,
    tls: TlsFiles,
    store: DirectoryStore,
    tools: PgTools,
    timeout_s: float,
    keep_daily: int,
    keep_weekly: int,
    kind: str = "scheduled",
    on_snapshot: Callable[[float], None] | None = None,
) -> BackupResult:
    """Dump ``url`` into ``store``; ``on_snapshot(unix_time)`` is told just before the snapshot
    is taken (tests use it to know which acknowledged writes the dump must contain)."""
    started = time.monotonic()
    now = datetime.now(UTC)
    store.remove_stale_partials(now)
    backup = store.new(now)
    partial = backup.dump.with_name(backup.dump.name + PARTIAL_SUFFIX)
    connection = await connect(url, tls)
    try:
        major = await server_major(connection)
        tools.require_major("pg_dump", major)
        transaction = connection.transaction(isolation="repeatable_read", readonly=True)
        await transaction.start()
        try:
            if on_snapshot is not None:
                on_snapshot(time.time())
            # The first statement of a REPEATABLE READ transaction takes its snapshot.
            snapshot_id = await connection.fetchval("SELECT pg_export_snapshot()")
            snapshot_at = datetime.now(UTC)
            tables = await fingerprints(connection)
            revision = await _alembic_revision(connection)
            target = Connection.from_url(url, tls)
            result = tools.run(
                "pg_dump",
                [
                    "--format=custom",
                    f"--snapshot={snapshot_id}",
                    "--no-password",
                    f"--file={partial}",
                    f"--dbname={target.conninfo}",
                ],
                target,
                timeout=timeout_s,
            )
        finally:
            await transaction.rollback()
    finally:
        await connection.close()
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BackupError(f"pg_dump failed: {last_error_line(result)}")
    partial.rename(backup.dump)
    size = backup.dump.stat().st_size
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "database": target.database,
        "created_at": backup.created_at.isoformat(),
        "snapshot_at": snapshot_at.isoformat(),
        "server_major": major,
        "alembic_revision": revision,
        "dump": {"file": backup.dump.name, "size_bytes": size, "sha256": sha256_of(backup.dump)},
        "tables": {name: fp.as_json() for name, fp in tables.items()},
    }
    # Written last and atomically: its presence is what makes the backup complete.
    temporary = backup.manifest_path.with_name(backup.manifest_path.name + PARTIAL_SUFFIX)
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    temporary.rename(backup.manifest_path)
    pruned = prune(store, keep_daily=keep_daily, keep_weekly=keep_weekly)
    return BackupResult(
        backup=backup,
        size_bytes=size,
        duration_s=time.monotonic() - started,
        tables=len(tables),
        rows=sum(fp.rows for fp in tables.values()),
        pruned=pruned,
    )


async def _alembic_revision(connection: Any) -> str | None:
    exists = await connection.fetchval("SELECT to_regclass('public.alembic_version') IS NOT NULL")
    if not exists:
        return None
    rows = await connection.fetch("SELECT version_num FROM public.alembic_version")
    return ",".join(sorted(row[0] for row in rows)) or None
