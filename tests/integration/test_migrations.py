"""Migrations on a real PostgreSQL: no drift from the models, reversible, safe concurrently."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, pool
from sqlalchemy.ext.asyncio import create_async_engine

from service.migrate import downgrade, head_revisions, upgrade
from service.orm import load_models
from testkit import libpq_url


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(libpq_url(url))
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


def _migrate_cli(url: str, environment: str = "test") -> subprocess.Popen[str]:
    env = {**os.environ, "DATABASE_URL": url, "ENVIRONMENT": environment}
    env["GATEWAY_REQUIRED"] = "false"  # production's other refusals are not the point here
    for name in ("DATABASE_MIGRATION_URL", "LOG_FORMAT", "LOG_LEVEL"):
        env.pop(name, None)
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
    done = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert {record["event"] for record in done} == {"migrate_done"}
    transitions = sorted((tuple(record["before"]), tuple(record["after"])) for record in done)
    head = tuple(sorted(head_revisions()))
    # Exactly one run moved the schema from empty to head; the other found it already there.
    assert transitions == sorted([((), head), (head, head)])
    conn = await asyncpg.connect(libpq_url(url))
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


@pytest.mark.parametrize("environment", ["staging", "production"])
async def test_migrate_logs_json_like_the_server(postgres, environment: str) -> None:
    # The migration Job's output goes to the same log pipeline as the pods': every line must
    # parse, including alembic's and the outcome.
    url = await postgres.create_database("jsonlog")
    process = _migrate_cli(url, environment)
    env_out, env_err = await asyncio.to_thread(process.communicate, timeout=120)
    assert process.returncode == 0, env_err
    records = [json.loads(line) for line in env_out.splitlines() if line.strip()]
    assert records, "the outcome is logged"
    assert records[-1]["event"] == "migrate_done"
    assert records[-1]["after"] == sorted(head_revisions())
    assert not env_err.strip(), env_err


async def test_migrate_in_development_prints_for_people(postgres) -> None:
    url = await postgres.create_database("consolelog")
    process = _migrate_cli(url, "development")
    out, err = await asyncio.to_thread(process.communicate, timeout=120)
    assert process.returncode == 0, err
    head = ",".join(sorted(head_revisions()))
    assert out.strip().splitlines()[-1] == f"schema: empty -> {head}"


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
    assert {"event": "migrate_downgraded", "revision": "base"}.items() <= records[-1].items()
    assert "tasks" not in await _tables(url)
