"""Gateway-trusted identity on the real app and a real PostgreSQL: the consumer the gateway names
is the principal only next to a valid gateway secret, and owns what it creates."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from securitykit import PROBE, security_app
from sqlalchemy import event, text
from structlog.testing import capture_logs

from service.security.principal import owner_id_from
from service.settings import Settings

SECRET = "current-gateway-secret-0123456789abcdef"
PREVIOUS = "previous-gateway-secret-0123456789abcdef"
MakeCredential = Callable[..., Awaitable[Any]]


def identity_settings(make_settings: Callable[..., Settings], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "gateway_shared_secret": SECRET,
        "gateway_secret_header": "x-zuplo-secret",
        "gateway_identity_enabled": True,
    }
    values.update(overrides)
    return make_settings(**values)


def through_gateway(consumer: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"x-zuplo-secret": SECRET, **extra}
    if consumer is not None:
        headers["X-Consumer-Id"] = consumer
    return headers


async def test_the_consumer_named_by_the_gateway_is_the_principal(
    make_settings: Callable[..., Settings],
) -> None:
    async with security_app(identity_settings(make_settings)) as running:
        response = await running.client.get(f"{PROBE}/read", headers=through_gateway("alice"))
        assert response.status_code == 200, response.text
        assert response.json() == {
            "owner_id": str(owner_id_from("alice")),
            "scopes": ["tasks:read", "tasks:write"],
            "auth_method": "gateway",
            "credential_id": "alice",
        }
        # A UUID subject is the owner id as given.
        owner = uuid.uuid4()
        response = await running.client.get(f"{PROBE}/read", headers=through_gateway(str(owner)))
        assert response.json()["owner_id"] == str(owner)
        # The access log names the consumer (the principal on the request scope).
        assert running.last_scope_state["principal"].credential_id == str(owner)


async def test_the_previous_secret_vouches_for_the_consumer_during_a_rotation(
    make_settings: Callable[..., Settings],
) -> None:
    settings = identity_settings(make_settings, gateway_shared_secret_previous=PREVIOUS)
    async with security_app(settings) as running:
        for secret in (SECRET, PREVIOUS):
            headers = {"x-zuplo-secret": secret, "X-Consumer-Id": "alice"}
            response = await running.client.get(f"{PROBE}/read", headers=headers)
            assert response.status_code == 200, response.text
            assert response.json()["credential_id"] == "alice"


async def test_without_the_secret_the_consumer_header_is_refused_and_logged(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    async with security_app(identity_settings(make_settings)) as running:
        with capture_logs() as logs:
            for secret in (None, "wrong", SECRET[:-1]):
                headers = {"X-Consumer-Id": "alice", **credential.headers}
                if secret is not None:
                    headers["x-zuplo-secret"] = secret
                response = await running.client.get(f"{PROBE}/read", headers=headers)
                assert response.status_code == 403, response.text
                assert response.json()["type"].endswith("/gateway-required")
    ignored = [entry for entry in logs if entry["event"] == "gateway_consumer_ignored"]
    assert len(ignored) == 3
    assert all("alice" not in str(entry) for entry in ignored)


async def test_the_header_is_ignored_when_the_mode_is_off(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    off = identity_settings(make_settings, gateway_identity_enabled=False)
    async with security_app(off) as running:
        response = await running.client.get(f"{PROBE}/read", headers=through_gateway("alice"))
        assert response.status_code == 401, response.text
        # The service's own key still decides who the caller is.
        headers = through_gateway("alice", **credential.headers)
        response = await running.client.get(f"{PROBE}/read", headers=headers)
        assert response.status_code == 200
        assert response.json()["owner_id"] == str(credential.owner_id)


async def test_service_keys_still_work_beside_gateway_consumers(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    async with security_app(identity_settings(make_settings)) as running:
        response = await running.client.get(
            f"{PROBE}/read", headers=through_gateway(**credential.headers)
        )
        assert response.status_code == 200
        assert response.json()["auth_method"] == "api_key"
        # Anonymous through the gateway: the service's own 401.
        response = await running.client.get(f"{PROBE}/read", headers=through_gateway())
        assert response.status_code == 401


@pytest.mark.parametrize(
    ("scopes_header", "allowed", "expected"),
    [
        (None, None, ["tasks:read", "tasks:write"]),  # no header: the default scopes
        ("tasks:read", None, ["tasks:read"]),
        ("tasks:read tasks:write", None, ["tasks:read", "tasks:write"]),
        ("tasks:write,tasks:read", None, ["tasks:read", "tasks:write"]),
        ("", None, []),  # the gateway said: none
        ("tasks:read admin nonsense", None, ["tasks:read"]),  # capped by the allowed list
        ("tasks:read admin", "tasks:read,tasks:write,admin", ["admin", "tasks:read"]),
    ],
)
async def test_scopes_come_from_the_gateway_within_the_allowed_list(
    make_settings: Callable[..., Settings],
    scopes_header: str | None,
    allowed: str | None,
    expected: list[str],
) -> None:
    overrides = {"gateway_consumer_allowed_scopes": allowed} if allowed else {}
    async with security_app(identity_settings(make_settings, **overrides)) as running:
        headers = through_gateway("alice")
        if scopes_header is not None:
            headers["X-Consumer-Scopes"] = scopes_header
        read = await running.client.get(f"{PROBE}/read", headers=headers)
        write = await running.client.post(f"{PROBE}/write", headers=headers, json={})
        admin = await running.client.get(f"{PROBE}/admin", headers=headers)
    granted = set(expected)
    may = lambda scope: "admin" in granted or scope in granted  # noqa: E731
    assert read.status_code == (200 if may("tasks:read") else 403), read.text
    assert write.status_code == (200 if may("tasks:write") else 403), write.text
    assert admin.status_code == (200 if "admin" in granted else 403), admin.text
    if read.status_code == 200:
        assert read.json()["scopes"] == expected


async def test_identity_headers_do_not_travel_further_in(
    make_settings: Callable[..., Settings],
) -> None:
    async with security_app(identity_settings(make_settings)) as running:
        headers = through_gateway("alice", **{"X-Consumer-Scopes": "tasks:read"})
        response = await running.client.get(f"{PROBE}/headers", headers=headers)
    assert response.status_code == 200
    names = {name.lower() for name in response.json()["names"]}
    assert not names & {"x-consumer-id", "x-consumer-scopes", "x-zuplo-secret"}


@pytest.mark.parametrize(
    "consumer_headers",
    [
        [("X-Consumer-Id", "alice"), ("X-Consumer-Id", "mallory")],
        [("X-Consumer-Id", "")],
        [("X-Consumer-Id", "x" * 201)],
        [("X-Consumer-Id", "caf\u00e9")],
    ],
    ids=["repeated", "empty", "too-long", "not-ascii"],
)
async def test_a_malformed_consumer_is_not_trusted(
    make_settings: Callable[..., Settings], consumer_headers: list[tuple[str, str]]
) -> None:
    async with security_app(identity_settings(make_settings)) as running:
        headers = [("x-zuplo-secret", SECRET), *consumer_headers]
        encoded = [(name.encode(), value.encode("utf-8")) for name, value in headers]
        with capture_logs() as logs:
            response = await running.client.get(f"{PROBE}/read", headers=encoded)
    assert response.status_code == 401, response.text
    assert any(entry["event"] == "gateway_consumer_rejected" for entry in logs)


async def test_a_gateway_consumer_owns_its_tasks(make_settings: Callable[..., Settings]) -> None:
    """Through the tasks API on PostgreSQL: one consumer's task is invisible to another."""
    async with security_app(identity_settings(make_settings)) as running:
        alice = f"alice-{uuid.uuid4()}"
        bob = f"bob-{uuid.uuid4()}"
        created = await running.client.post(
            "/v1/tasks", headers=through_gateway(alice), json={"title": "gateway-owned"}
        )
        assert created.status_code == 201, created.text
        task = created.json()
        async with running.state.database.engine.connect() as conn:
            owner = await conn.scalar(
                text("SELECT owner_id FROM tasks WHERE id = :id"), {"id": task["id"]}
            )
        assert owner == owner_id_from(alice)
        mine = await running.client.get("/v1/tasks", headers=through_gateway(alice))
        assert [item["id"] for item in mine.json()["items"]] == [task["id"]]
        theirs = await running.client.get("/v1/tasks", headers=through_gateway(bob))
        assert theirs.json()["items"] == []
        stolen = await running.client.get(f"/v1/tasks/{task['id']}", headers=through_gateway(bob))
        assert stolen.status_code == 404


async def test_the_per_principal_rate_limit_counts_per_consumer(
    make_settings: Callable[..., Settings],
) -> None:
    settings = identity_settings(
        make_settings, rate_limit_enabled=True, rate_limit_default="2/minute"
    )
    async with security_app(settings) as running:
        statuses = [
            (
                await running.client.get(f"{PROBE}/read", headers=through_gateway("carol"))
            ).status_code
            for _ in range(3)
        ]
        other = await running.client.get(f"{PROBE}/read", headers=through_gateway("dave"))
    assert statuses == [200, 200, 429]
    assert other.status_code == 200


async def test_a_gateway_consumer_costs_no_database_round_trip(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    """The gateway verified the key: no lookup here, where an API key needs one (cache cold)."""
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    async with security_app(identity_settings(make_settings)) as running:
        engine = running.state.database.engine.sync_engine
        event.listen(engine, "before_cursor_execute", count)
        try:
            for consumer in ("erin", "frank", "erin"):
                response = await running.client.get(
                    f"{PROBE}/read", headers=through_gateway(consumer)
                )
                assert response.status_code == 200
            assert statements == []
            # The counter counts: the service's own key is looked up (its cache is cold).
            credential = await make_credential()
            keyed = await running.client.get(
                f"{PROBE}/read", headers=through_gateway(**credential.headers)
            )
            assert keyed.status_code == 200
            assert len(statements) >= 1
        finally:
            event.remove(engine, "before_cursor_execute", count)
