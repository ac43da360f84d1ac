"""Least privilege on a real PostgreSQL: the migration role owns the schema, the app role only
reads and writes rows.

Two fresh login roles and a database owned by the first; ``migrate`` runs as the owner (and
applies the grants, as it does whenever the two URLs name different users); then the whole API
runs as the app role, every kind of DDL, TRUNCATE and role change is refused to it, and a table
the owner creates later (a future migration) is usable by the app without re-granting.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from service.db import Database
from service.entrypoints.cli import main
from service.security.api_keys import ApiKeyRepository
from service.settings import Settings
from testkit import libpq_url


@dataclass(frozen=True)
class Roles:
    owner_url: str
    app_url: str
    app_role: str


def libpq(url: str) -> str:
    return libpq_url(url)


def _role_env(roles: Roles, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "ENVIRONMENT": "test",
        "DATABASE_URL": roles.app_url,
        "DATABASE_MIGRATION_URL": roles.owner_url,
        "LOG_LEVEL": "WARNING",
    }.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
async def roles(postgres: Any) -> AsyncIterator[Roles]:
    """Created and migrated once for the module: the tests only read, or add their own table."""
    suffix = uuid.uuid4().hex[:8]
    owner, app, database = f"owner_{suffix}", f"app_{suffix}", f"roles_{suffix}"
    owner_pw, app_pw = uuid.uuid4().hex, uuid.uuid4().hex
    await postgres.admin_execute(f"CREATE ROLE {owner} LOGIN PASSWORD '{owner_pw}'")
    await postgres.admin_execute(f"CREATE ROLE {app} LOGIN PASSWORD '{app_pw}'")
    await postgres.admin_execute(f"CREATE DATABASE {database} OWNER {owner}")
    base = make_url(postgres.url).set(database=database)
    owner_url = base.set(username=owner, password=owner_pw).render_as_string(hide_password=False)
    app_url = base.set(username=app, password=app_pw).render_as_string(hide_password=False)
    created = Roles(owner_url, app_url, app)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            _role_env(created, monkeypatch)
            assert await asyncio.to_thread(main, ["migrate"]) == 0
        yield created
    finally:
        await postgres.admin_execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        await postgres.admin_execute(f"DROP ROLE IF EXISTS {app}")
        await postgres.admin_execute(f"DROP ROLE IF EXISTS {owner}")


async def test_the_whole_api_works_as_the_app_role(
    roles: Roles, make_settings: Callable[..., Settings], app_client: Any
) -> None:
    settings = make_settings(database_url=roles.app_url)
    database = Database(settings)
    try:
        async for session in database.session():
            key, _ = await ApiKeyRepository(session).create(
                owner_id=uuid.uuid4(), scopes=["tasks:read", "tasks:write"]
            )
    finally:
        await database.dispose()
    headers = {"X-API-Key": key}
    async with app_client(settings) as client:
        assert (await client.get("/health/ready")).status_code == 200
        created = await client.post(
            "/v1/tasks",
            json={"title": "as app", "tags": ["roles"]},
            headers={**headers, "Idempotency-Key": str(uuid.uuid4())},
        )
        assert created.status_code == 201, created.text
        path = created.headers["location"]
        assert (await client.get(path, headers=headers)).status_code == 200
        listed = await client.get("/v1/tasks", headers=headers)
        assert [t["title"] for t in listed.json()["items"]] == ["as app"]
        patched = await client.patch(
            path, json={"status": "done"}, headers={**headers, "If-Match": '"1"'}
        )
        assert patched.status_code == 200, patched.text
        assert (await client.delete(path, headers=headers)).status_code == 204
        assert (await client.get(path, headers=headers)).status_code == 404


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE sneaky (id int)",
        "ALTER TABLE tasks ADD COLUMN sneaky int",
        "DROP TABLE tasks",
        "TRUNCATE tasks",
        "CREATE INDEX sneaky ON tasks (title)",
        "UPDATE alembic_version SET version_num = 'x'",
        "CREATE ROLE sneaky",
        "CREATE SCHEMA sneaky",
        "CREATE FUNCTION sneaky() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    ],
)
async def test_the_app_role_cannot_change_the_schema_or_roles(roles: Roles, statement: str) -> None:
    conn = await asyncpg.connect(libpq(roles.app_url))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)
    finally:
        await conn.close()


async def test_the_app_role_cannot_change_its_own_or_the_owners_role(roles: Roles) -> None:
    owner = make_url(roles.owner_url).username
    conn = await asyncpg.connect(libpq(roles.app_url))
    try:
        for statement in (
            f"ALTER ROLE {owner} PASSWORD 'taken'",
            f"ALTER ROLE {roles.app_role} CREATEROLE",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()


async def test_tables_the_owner_creates_later_are_usable_by_the_app_role(roles: Roles) -> None:
    owner = await asyncpg.connect(libpq(roles.owner_url))
    try:  # what a future migration does
        await owner.execute("CREATE TABLE later (id bigserial PRIMARY KEY, note text NOT NULL)")
    finally:
        await owner.close()
    app = await asyncpg.connect(libpq(roles.app_url))
    try:
        new_id = await app.fetchval("INSERT INTO later (note) VALUES ('hello') RETURNING id")
        assert await app.fetchval("SELECT note FROM later WHERE id = $1", new_id) == "hello"
        await app.execute("UPDATE later SET note = 'bye'")
        await app.execute("DELETE FROM later")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.execute("TRUNCATE later")
    finally:
        await app.close()


async def test_migrate_as_the_owner_is_idempotent_and_keeps_the_grants(
    roles: Roles, monkeypatch: pytest.MonkeyPatch
) -> None:
    _role_env(roles, monkeypatch)
    assert await asyncio.to_thread(main, ["migrate"]) == 0
    assert await asyncio.to_thread(main, ["grant-app-role"]) == 0
    app = await asyncpg.connect(libpq(roles.app_url))
    try:
        assert await app.fetchval("SELECT count(*) FROM tasks") == 0
        assert await app.fetchval("SELECT count(*) FROM alembic_version") == 1
    finally:
        await app.close()


async def test_grants_refuse_one_role_for_both(
    roles: Roles, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _role_env(roles, monkeypatch)
    monkeypatch.setenv("DATABASE_URL", roles.owner_url)
    assert await asyncio.to_thread(main, ["grant-app-role"]) == 2
    assert "give the app its own role" in capsys.readouterr().err


async def test_a_missing_app_role_is_named_and_does_not_fail_the_migration(
    roles: Roles, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _role_env(roles, monkeypatch)
    ghost = make_url(roles.app_url).set(username="ghost_role").render_as_string(hide_password=False)
    monkeypatch.setenv("DATABASE_URL", ghost)
    assert await asyncio.to_thread(main, ["migrate"]) == 0
    assert "warning: grants skipped: role 'ghost_role' does not exist" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["grant-app-role"]) == 2
    assert "role 'ghost_role' does not exist" in capsys.readouterr().err
