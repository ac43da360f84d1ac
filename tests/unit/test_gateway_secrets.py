"""Gateway secret matching (no I/O): constant-time digests, rotation, header normalisation."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import pytest
from structlog.testing import capture_logs

from service.middleware.gateway import GatewaySecretMiddleware
from service.middleware.probes import PROBE_PATHS
from service.security.gateway import GatewaySecrets
from service.settings import load_settings

CURRENT = "c" * 40
PREVIOUS = "p" * 40


def test_current_and_previous_secret_are_both_accepted() -> None:
    secrets = GatewaySecrets("X-Gateway-Secret", [CURRENT, PREVIOUS])
    assert secrets.accepts(CURRENT.encode())
    assert secrets.accepts(PREVIOUS.encode())
    for wrong in (
        b"",
        b"c",
        CURRENT[:-1].encode(),
        (CURRENT + "c").encode(),
        CURRENT.upper().encode(),
    ):
        assert not secrets.accepts(wrong)


def test_header_name_is_matched_as_asgi_presents_it() -> None:
    assert GatewaySecrets(" x-Zuplo-Secret ", [CURRENT]).header == b"x-zuplo-secret"


def test_from_settings() -> None:
    assert GatewaySecrets.from_settings(load_settings(environment="test")) is None
    secrets = GatewaySecrets.from_settings(
        load_settings(
            environment="test",
            gateway_shared_secret=CURRENT,
            gateway_shared_secret_previous=PREVIOUS,
            gateway_secret_header="x-zuplo-secret",
        )
    )
    assert secrets is not None
    assert secrets.header == b"x-zuplo-secret"
    assert secrets.accepts(PREVIOUS.encode())


@pytest.mark.parametrize(("header", "values"), [("", [CURRENT]), ("X-Gateway-Secret", [""])])
def test_nothing_to_compare_is_a_programming_error(header: str, values: list[str]) -> None:
    with pytest.raises(ValueError, match="secret"):
        GatewaySecrets(header, values)


def test_probe_paths_are_exactly_the_health_routes() -> None:
    assert {"/health", "/health/live", "/health/ready", "/health/startup"} == PROBE_PATHS


async def test_websocket_without_the_secret_is_closed_with_policy_violation() -> None:
    reached: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope)

    middleware = GatewaySecretMiddleware(app, secrets=GatewaySecrets("x-gw", [CURRENT]))
    sent: list[dict[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    scope = {"type": "websocket", "path": "/v1/ws", "headers": [(b"x-gw", b"wrong")]}
    await middleware(scope, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]
    assert reached == []

    scope = {"type": "websocket", "path": "/v1/ws", "headers": [(b"x-gw", CURRENT.encode())]}
    await middleware(scope, receive, send)
    assert reached[0]["headers"] == []  # passed on, without the secret


async def test_lifespan_messages_pass_untouched() -> None:
    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["type"])

    middleware = GatewaySecretMiddleware(app, secrets=GatewaySecrets("x-gw", [CURRENT]))
    await middleware({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert reached == ["lifespan"]


def test_disabled_handshake_in_production_like_environments_is_logged() -> None:
    with capture_logs() as logs:
        assert GatewaySecrets.from_settings(load_settings(environment="staging")) is None
    assert any(entry["event"] == "gateway_handshake_disabled" for entry in logs)
