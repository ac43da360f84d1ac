"""/health/startup (Render's health check): fails until the database answered at the expected
schema once, then answers from memory. The outage half is in tests/stack/test_render_health.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import event

from appkit import serving
from service.settings import Settings
from testkit import free_port


async def test_passes_once_the_database_answered_and_then_without_asking_again(
    make_settings: Callable[..., Settings],
) -> None:
    async with serving(make_settings()) as running:
        lifecycle = running.state.lifecycle
        assert lifecycle.started is False
        first = await running.client.get("/health/startup")
        assert first.status_code == 200, first.text
        assert first.json() == {"status": "started"}
        assert lifecycle.started is True
        # From now on no statement reaches the database.
        statements: list[str] = []

        def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            statements.append(statement)

        engine = running.state.database.engine.sync_engine
        event.listen(engine, "before_cursor_execute", count)
        try:
            for _ in range(5):
                assert (await running.client.get("/health/startup")).status_code == 200
            # The counter counts: readiness does query.
            assert (await running.client.get("/health/ready")).status_code == 200
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert len(statements) == 1, statements


async def test_fails_while_the_database_does_not_answer(
    make_settings: Callable[..., Settings],
) -> None:
    nowhere = f"postgresql://app:pw@127.0.0.1:{free_port()}/app"
    settings = make_settings(database_url=nowhere, database_connect_timeout=0.5)
    async with serving(settings) as running:
        for _ in range(2):
            response = await running.client.get("/health/startup")
            assert response.status_code == 503
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["retry-after"] == "5"
            body: dict[str, Any] = response.json()
            assert body["type"].endswith("/unavailable")
            assert "127.0.0.1" not in response.text
        assert running.state.lifecycle.started is False
        # Liveness is unaffected: the process serves.
        assert (await running.client.get("/health/live")).status_code == 200


async def test_fails_while_the_schema_is_behind(
    make_settings: Callable[..., Settings], postgres: Any
) -> None:
    never_migrated = await postgres.create_database("startup")
    async with serving(make_settings(database_url=never_migrated)) as running:
        response = await running.client.get("/health/startup")
    assert response.status_code == 503
    assert response.json()["type"].endswith("/outdated-schema")


async def test_needs_no_gateway_secret(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(gateway_shared_secret="s" * 40)
    async with serving(settings) as running:
        assert (await running.client.get("/health/startup")).status_code == 200
        assert (await running.client.get("/v1/tasks")).status_code == 403
