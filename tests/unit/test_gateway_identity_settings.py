"""Settings of gateway-trusted identity: opt-in, refused where nothing could vouch for it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from service.security.gateway_identity import GatewayIdentity
from service.settings import ConfigError, load_settings

SECRET = "g" * 40
DB = "postgresql://app:pw@db:5432/app?sslmode=require"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(("DATABASE_", "GATEWAY_", "SECRETS")):
            monkeypatch.delenv(name, raising=False)
    for name in ("ENVIRONMENT", "DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def identity(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "environment": "production",
        "database_url": DB,
        "gateway_shared_secret": SECRET,
        "gateway_identity_enabled": True,
    }
    values.update(overrides)
    return values


def test_off_by_default() -> None:
    settings = load_settings(environment="test")
    assert settings.gateway_identity_enabled is False
    assert GatewayIdentity.from_settings(settings) is None


def test_production_accepts_it_with_the_gateway_required() -> None:
    settings = load_settings(**identity())
    found = GatewayIdentity.from_settings(settings)
    assert found is not None
    assert found.consumer_header == b"x-consumer-id"
    assert found.scopes_header == b"x-consumer-scopes"
    assert found.default_scopes == {"tasks:read", "tasks:write"}


def test_refused_in_production_unless_the_gateway_secret_is_required() -> None:
    with pytest.raises(ConfigError, match="refused in production unless GATEWAY_REQUIRED=true"):
        load_settings(**identity(gateway_required=False))


@pytest.mark.parametrize("environment", ["development", "test", "staging", "production"])
def test_refused_without_a_gateway_secret_in_every_environment(environment: str) -> None:
    # Nothing would prove the header came from the gateway.
    with pytest.raises(ConfigError, match="GATEWAY_IDENTITY_ENABLED needs GATEWAY_SHARED_SECRET"):
        load_settings(**identity(environment=environment, gateway_shared_secret=None))


def test_header_names_and_scopes_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CONSUMER_HEADER", "X-Zuplo-Consumer")
    monkeypatch.setenv("GATEWAY_CONSUMER_SCOPES_HEADER", "")
    monkeypatch.setenv("GATEWAY_CONSUMER_DEFAULT_SCOPES", "tasks:read")
    monkeypatch.setenv("GATEWAY_CONSUMER_ALLOWED_SCOPES", "tasks:read,admin")
    found = GatewayIdentity.from_settings(load_settings(**identity()))
    assert found is not None
    assert found.consumer_header == b"x-zuplo-consumer"
    assert found.scopes_header is None
    assert found.default_scopes == {"tasks:read"}
    assert found.allowed_scopes == {"tasks:read", "admin"}


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"gateway_consumer_default_scopes": "tasks:read,root"}, "unknown scope root"),
        ({"gateway_consumer_allowed_scopes": "everything"}, "unknown scope everything"),
        (
            {"gateway_consumer_default_scopes": "admin"},
            "DEFAULT_SCOPES must be within GATEWAY_CONSUMER_ALLOWED_SCOPES",
        ),
        ({"gateway_consumer_header": "x-zuplo-secret"}, "must differ"),
        ({"gateway_consumer_scopes_header": "X-Consumer-Id"}, "must differ"),
        ({"gateway_consumer_header": "X Consumer"}, "must be an HTTP header name"),
        ({"gateway_consumer_header": ""}, "must be an HTTP header name"),
        ({"gateway_consumer_scopes_header": "scopes:"}, "must be an HTTP header name"),
    ],
)
def test_inconsistent_values_are_refused(overrides: dict[str, Any], complaint: str) -> None:
    values = identity(gateway_secret_header="x-zuplo-secret", **overrides)
    with pytest.raises(ConfigError, match=complaint):
        load_settings(**values)
