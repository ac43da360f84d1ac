"""Test infrastructure: a real PostgreSQL, an app factory, and credentials.

PostgreSQL comes from, in order: ``TEST_DATABASE_URL`` (CI's service container, your own
server), testcontainers when a Docker engine answers, else an embedded PostgreSQL 16 from the
``pgserver`` wheel. Never SQLite, never a mock. The schema is migrated once per session; tests
isolate themselves by owner (every test gets fresh owner ids), and tests that need an empty or
unmigrated database create a scratch database.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from appkit import serving
from service.db import Database
from service.migrate import upgrade
from service.security.api_keys import ApiKeyRepository
from service.settings import Settings, load_settings
from service.tools.embedded_postgres import EmbeddedPostgres
from testkit import libpq_url


@dataclass
class PostgresUnderTest:
    """The test PostgreSQL: its migrated database URL and a way to make scratch databases."""

    url: str
    source: str
    embedded: EmbeddedPostgres | None = None
    _scratch: list[str] = field(default_factory=list)

    async def create_database(self, prefix: str = "scratch") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        conn = await asyncpg.connect(libpq_url(self.url))
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self._scratch.append(name)
        return make_url(self.url).set(database=name).render_as_string(hide_password=False)

    async def migrated_database(self, prefix: str, setup_sql: str = "") -> str:
        """A scratch database at the schema's head, with ``setup_sql`` run in it (a trigger a
        test needs, say)."""
        url = await self.create_database(prefix)
        await upgrade(url)
        if setup_sql:
            conn = await asyncpg.connect(libpq_url(url))
            try:
                await conn.execute(setup_sql)
            finally:
                await conn.close()
        return url

    async def admin_execute(self, sql: str) -> None:
        """Run ``sql`` as a superuser-like role (creating roles needs CREATEROLE).

        The embedded server's URL user may only create databases, so its superuser runs it over
        the Unix socket; other sources hand out a superuser URL (testcontainers, CI's service).
        """
        if self.embedded is not None:
            self.embedded.psql(sql)
            return
        conn = await asyncpg.connect(libpq_url(self.url))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def drop_scratch(self) -> None:
        # As the administrator: FORCE must be allowed to end every session in the database,
        # including an autovacuum worker busy with a table a test filled.
        for name in self._scratch:
            await self.admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresUnderTest]:
    given = os.environ.get("TEST_DATABASE_URL")
    if given:
        from service.settings import normalise_database_url

        yield PostgresUnderTest(normalise_database_url(given), "TEST_DATABASE_URL")
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver="asyncpg") as container:
            yield PostgresUnderTest(container.get_connection_url(), "testcontainers")
        return
    data_dir = Path(tempfile.mkdtemp(prefix="fastapi-app-test-pg-"))
    server = EmbeddedPostgres(data_dir, database="app_test").start()
    try:
        yield PostgresUnderTest(server.url, "embedded", embedded=server)
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
async def database_url(postgres: PostgresUnderTest) -> AsyncIterator[str]:
    """A migrated database for the whole session."""
    url = await postgres.create_database("app")
    await upgrade(url)
    yield url
    await postgres.drop_scratch()


@pytest.fixture(scope="session")
def make_settings(database_url: str) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "environment": "test",
            "database_url": database_url,
            "rate_limit_enabled": False,
            "log_level": "WARNING",
        }
        values.update(overrides)
        return load_settings(**values)

    return factory


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app with its lifespan, served in-process through httpx."""
    async with serving(settings) as served:
        yield served.client


@pytest.fixture(scope="session")
async def client(make_settings: Callable[..., Settings]) -> AsyncIterator[httpx.AsyncClient]:
    """A shared client on the default test settings (tests isolate by owner)."""
    async with running_app(make_settings()) as http:
        yield http


@pytest.fixture(scope="session")
def app_client() -> Callable[[Settings], Any]:
    """``async with app_client(settings) as client:`` for tests that need their own settings."""
    return running_app


@dataclass(frozen=True)
class Credential:
    owner_id: uuid.UUID
    key: str
    prefix: str

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key}


@pytest.fixture(scope="session")
async def database(make_settings: Callable[..., Settings]) -> AsyncIterator[Database]:
    db = Database(make_settings())
    yield db
    await db.dispose()


@pytest.fixture(scope="session")
def make_credential(database: Database) -> Callable[..., Awaitable[Credential]]:
    async def factory(
        scopes: tuple[str, ...] = ("tasks:read", "tasks:write"),
        owner_id: uuid.UUID | None = None,
        **kwargs: Any,
    ) -> Credential:
        owner = owner_id or uuid.uuid4()
        async for session in database.session():
            plaintext, key = await ApiKeyRepository(session).create(
                owner_id=owner, scopes=list(scopes), **kwargs
            )
        return Credential(owner, plaintext, key.prefix)

    return factory


@pytest.fixture
async def credential(make_credential: Callable[..., Awaitable[Credential]]) -> Credential:
    """A fresh owner with read+write scopes."""
    return await make_credential()
