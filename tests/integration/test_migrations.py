"""Migrations on a real PostgreSQL: no drift from the models, reversible, safe concurrently."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import asyncpg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, pool
from sqlalchemy.ext.asyncio import create_async_engine

from service.migrate import downgrade, head_revisions, upgrade
from service.orm import load_models


def _libpq(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(_libpq(url))
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {row["tablename"] for row in rows}


async def test_autogenerate_against_models_yields_no_diff(database_url: str) -> None:
    metadata = load_models()

    def diff(connection: Connection) -> list[object]:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, metadata))

    engine = create_async_engine(database_url, poolclass=pool.NullPool)
    async with engine.connect() as connection:
        differences = await connection.run_sync(diff)
    await engine.dispose()
    assert differences == []


async def test_upgrade_downgrade_upgrade_round_trip(postgres) -> None:
    url = await postgres.create_database("roundtrip")
    before, after = await upgrade(url)
    assert before == set()
    assert after == head_revisions()
    assert {"tasks", "api_keys", "idempotency_keys", "alembic_version"} <= await _tables(url)

    await downgrade(url, "base")
    assert await _tables(url) == {"alembic_version"}

    before, after = await upgrade(url)
    assert before == set()
    assert after == head_revisions()
    assert "tasks" in await _tables(url)


async def test_upgrade_at_head_is_a_no_op(database_url: str) -> None:
    before, after = await upgrade(database_url)
    assert before == after == head_revisions()


def _migrate_cli(url: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DATABASE_URL": url, "ENVIRONMENT": "test"}
    env.pop("DATABASE_MIGRATION_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "service", "migrate"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_two_concurrent_migrate_runs_both_succeed_and_migrate_once(postgres) -> None:
    url = await postgres.create_database("concurrent")
    # Count DDL by watching CREATE TABLE events: a second, unlocked run would fail on them.
    first, second = _migrate_cli(url), _migrate_cli(url)
    outputs = await asyncio.gather(
        asyncio.to_thread(first.communicate, timeout=120),
        asyncio.to_thread(second.communicate, timeout=120),
    )
    assert first.returncode == 0, outputs[0][1]
    assert second.returncode == 0, outputs[1][1]
    # Every line is a JSON log record (the Job's logs go to the same pipeline as the server's).
    records = [
        [json.loads(line) for line in out.splitlines() if line.strip()] for out, _ in outputs
    ]
    done = [next(r for r in run if r["event"] == "migrate_done") for run in records]
    head = sorted(head_revisions())
    # Exactly one run moved the schema from empty to head; the other found it already there.
    transitions = sorted((r["before"], r["after"]) for r in done)
    assert transitions == sorted([([], head), (head, head)])
    conn = await asyncpg.connect(_libpq(url))
    try:
        versions = await conn.fetch("SELECT version_num FROM alembic_version")
    finally:
        await conn.close()
    assert {row["version_num"] for row in versions} == head_revisions()


async def test_migrate_prefers_the_direct_migration_url(postgres) -> None:
    target = await postgres.create_database("direct")
    env = {
        **os.environ,
        "ENVIRONMENT": "test",
        # The pooled URL points nowhere: migrate must not use it when a migration URL is given.
        "DATABASE_URL": "postgresql://nobody:nothing@127.0.0.1:1/nowhere",
        "DATABASE_MIGRATION_URL": target,
    }
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "tasks" in await _tables(target)


async def test_migrate_cli_downgrades_and_says_so_in_json(postgres) -> None:
    url = await postgres.create_database("cli_downgrade")
    await upgrade(url)
    env = {**os.environ, "ENVIRONMENT": "test", "DATABASE_URL": url}
    env.pop("DATABASE_MIGRATION_URL", None)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service", "migrate", "--downgrade", "base"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert {"event": "migrate_downgraded", "to": "base"}.items() <= records[-1].items()
    assert "tasks" not in await _tables(url)
