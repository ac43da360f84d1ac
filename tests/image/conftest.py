"""The container image, built once per session by `make image`'s script and run for real.

Engine: docker when a daemon answers, else buildah (build) + podman (run). Without either the
tests skip with the reason here and fail in CI (testkit.require_binary): .ci/run installs
buildah and podman. The first build on a machine that cannot pull the base images creates
stand-ins for them (.docker/stand-in-base, about 90 s, once); later sessions reuse them and the
engine's layer cache, so a session's build costs seconds unless uv.lock changed.

Everything runs against the session's real PostgreSQL (tests/conftest.py), reached over
127.0.0.1 from containers sharing the host's network namespace.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from .image_engine import Build, Engine
from .imagekit import GATEWAY_SECRET, Migration


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    found = Engine.detect()
    yield found
    for name in list(found.started):
        found.remove(name)


@pytest.fixture(scope="session")
def build(engine: Engine) -> Iterator[Build]:
    built = engine.build(f"fastapi-app:test-{uuid.uuid4().hex[:10]}")
    print(f"\nimage: {built.reference} built with {built.engine} in {built.seconds:.0f} s")
    yield built
    engine.untag(built.reference)


@pytest.fixture(scope="session")
def image(build: Build) -> str:
    return build.reference


@pytest.fixture(scope="session")
async def fresh_database(postgres: Any) -> AsyncIterator[str]:
    """An empty database: the image's own `migrate` creates the schema the other tests use."""
    url = await postgres.create_database("image")
    yield url
    await postgres.drop_scratch()


@pytest.fixture(scope="session")
def migration(engine: Engine, image: str, fresh_database: str) -> Migration:
    result = engine.run(
        image,
        ["migrate"],
        # The chart's migration Job gets the app's config and Secret, gateway secret included.
        env={
            "DATABASE_URL": fresh_database,
            "GATEWAY_SHARED_SECRET": GATEWAY_SECRET,
            "LOG_LEVEL": "INFO",
        },
    )
    return Migration(result.returncode, result.stdout, result.stderr)


@pytest.fixture(scope="session")
def migrated_database(migration: Migration, fresh_database: str) -> str:
    assert migration.returncode == 0, migration.stdout + migration.stderr
    return fresh_database


@pytest.fixture(scope="session")
def api_key(engine: Engine, image: str, migrated_database: str) -> str:
    """Minted by the image's own `create-api-key` (printed once, last line)."""
    result = engine.run(
        image,
        [
            "create-api-key",
            "--owner",
            f"image-{uuid.uuid4()}",
            "--scopes",
            "tasks:read,tasks:write",
        ],
        env={"DATABASE_URL": migrated_database, "GATEWAY_SHARED_SECRET": GATEWAY_SECRET},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-1]
