"""``python -m service migrate``: upgrade the schema, safely from any number of pods at once.

A session-level PostgreSQL advisory lock serialises concurrent runs (a Helm hook retried while
the first attempt is still running, two releases racing): the second waits, then finds the
schema at head and does nothing. Session-level locks need a real session, which is why this uses
``DATABASE_MIGRATION_URL`` (a direct connection) when set: behind PgBouncer in transaction mode
the lock and the migration could land on different server connections.
"""

from __future__ import annotations

from pathlib import Path

import stamina
import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, pool, text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from service.dbtls import TlsFiles, asyncpg_ssl, tls_failure
from service.errors import is_connection_error

# Any fixed 64-bit number unique to this application's schema lock.
MIGRATION_LOCK_KEY = 0x66617374617069  # "fastapi" in ASCII
MIGRATIONS_DIR = Path(__file__).parent / "migrations"

log = structlog.get_logger("service.migrate")


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revisions() -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


def current_revisions(connection: Connection) -> set[str]:
    return set(MigrationContext.configure(connection).get_current_heads())


def _worth_retrying(exc: Exception) -> bool:
    # A certificate that does not verify will not verify in five seconds either.
    return is_connection_error(exc) and tls_failure(exc) is None


@stamina.retry(on=_worth_retrying, attempts=10, timeout=60, wait_max=5)
async def _connect(engine_url: str, tls: TlsFiles | None = None) -> tuple[AsyncConnection, object]:
    url, ssl_argument = asyncpg_ssl(engine_url, tls or TlsFiles())
    connect_args = {"ssl": ssl_argument} if ssl_argument is not None else {}
    engine = create_async_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
    try:
        connection = await engine.connect()
    except BaseException:
        await engine.dispose()
        raise
    return connection, engine


async def upgrade(
    url: str, revision: str = "head", *, tls: TlsFiles | None = None
) -> tuple[set[str], set[str]]:
    """Upgrade to ``revision`` under the advisory lock; returns (before, after) revisions."""
    connection, engine = await _connect(url, tls)
    try:
        await connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        await connection.commit()
        try:
            before = await connection.run_sync(current_revisions)
            await connection.commit()

            def run(sync_connection: Connection) -> None:
                config = alembic_config()
                config.attributes["connection"] = sync_connection
                command.upgrade(config, revision)

            await connection.run_sync(run)
            await connection.commit()
            after = await connection.run_sync(current_revisions)
            await connection.commit()
        finally:
            await connection.execute(
                text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
            await connection.commit()
    finally:
        await connection.close()
        await engine.dispose()  # type: ignore[attr-defined]
    log.info("migrate_done", before=sorted(before), after=sorted(after))
    return before, after


async def downgrade(url: str, revision: str, *, tls: TlsFiles | None = None) -> None:
    connection, engine = await _connect(url, tls)
    try:
        await connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        await connection.commit()

        def run(sync_connection: Connection) -> None:
            config = alembic_config()
            config.attributes["connection"] = sync_connection
            command.downgrade(config, revision)

        await connection.run_sync(run)
        await connection.commit()
        await connection.execute(
            text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY}
        )
        await connection.commit()
    finally:
        await connection.close()
        await engine.dispose()  # type: ignore[attr-defined]
    log.info("migrate_downgraded", revision=revision)
