"""Settings for the security knobs: gateway, JWT, rate limits, Redis."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from service.security.algorithms import effective_algorithms
from service.settings import ConfigError, load_settings

SECRET = "g" * 40
DB = "postgresql://app:pw@db:5432/app?sslmode=require"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(("DATABASE_", "GATEWAY_", "JWT_", "JWKS_", "RATE_LIMIT", "SECRETS")):
            monkeypatch.delenv(name, raising=False)
    for name in ("ENVIRONMENT", "DEBUG", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def production(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "environment": "production",
        "database_url": DB,
        "gateway_shared_secret": SECRET,
    }
    values.update(overrides)
    return values


def test_production_refuses_to_start_without_the_gateway_secret() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_SHARED_SECRET is required in production"):
        load_settings(**production(gateway_shared_secret=None))


def test_production_without_gateway_needs_gateway_required_false(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_REQUIRED", "false")
    settings = load_settings(**production(gateway_shared_secret=None))
    assert settings.gateway_required is False
    assert settings.gateway_shared_secret is None


def test_empty_gateway_secret_counts_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_SHARED_SECRET", "  ")
    with pytest.raises(ConfigError, match="GATEWAY_SHARED_SECRET"):
        load_settings(environment="production", database_url=DB)


@pytest.mark.parametrize(
    "name", ["gateway_shared_secret", "gateway_shared_secret_previous", "jwt_secret_key"]
)
def test_short_secrets_are_refused_in_production(name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name.upper()} must be at least 32 characters"):
        load_settings(**production(**{name: "x" * 31}))


def test_short_secrets_are_fine_outside_production() -> None:
    settings = load_settings(environment="staging", gateway_shared_secret="short")
    assert settings.gateway_shared_secret is not None


def test_gateway_header_is_configurable_for_zuplo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_SECRET_HEADER", "x-zuplo-secret")
    assert load_settings().gateway_secret_header == "x-zuplo-secret"


@pytest.mark.parametrize("value", ["100/minute", "10/second;300/minute", "5 per hour"])
def test_rate_limit_strings(value: str) -> None:
    assert load_settings(rate_limit_default=value, rate_limit_per_ip=value)


@pytest.mark.parametrize("name", ["RATE_LIMIT_DEFAULT", "RATE_LIMIT_PER_IP"])
def test_bad_rate_limit_names_the_variable(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, "lots")
    with pytest.raises(ConfigError, match=f"{name}: must look like '100/minute'"):
        load_settings()


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "rediss://:pw@cache:6380", "async+redis://h:1"]
)
def test_redis_urls(url: str) -> None:
    settings = load_settings(redis_url=url)
    assert settings.redis_url is not None


def test_bad_redis_url_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError, match="REDIS_URL: must be a redis://") as error:
        load_settings(redis_url="http://:hunter2@cache")
    assert "hunter2" not in str(error.value)


def test_jwks_needs_issuer_and_audience() -> None:
    with pytest.raises(ConfigError, match="JWT_JWKS_URL needs JWT_ISSUER and JWT_AUDIENCE"):
        load_settings(jwt_jwks_url="https://idp.example/jwks.json", jwt_issuer="https://idp")
    assert load_settings(
        jwt_jwks_url="https://idp.example/jwks.json",
        jwt_issuer="https://idp.example/",
        jwt_audience="fastapi-app",
    )


def test_jwks_must_be_https_in_production() -> None:
    jwt = {"jwt_issuer": "https://idp", "jwt_audience": "api"}
    with pytest.raises(ConfigError, match="must be https in production"):
        load_settings(**production(jwt_jwks_url="http://idp/jwks.json", **jwt))
    with pytest.raises(ConfigError, match="must be an https"):
        load_settings(jwt_jwks_url="file:///etc/jwks.json", **jwt)
    assert load_settings(jwt_jwks_url="http://127.0.0.1:8080/jwks.json", **jwt)


@pytest.mark.parametrize("algorithms", ["none", "HS256,none", "RS256,XS1", ""])
def test_jwt_algorithm_allow_list_is_validated(
    algorithms: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JWT_ALGORITHMS", algorithms)
    with pytest.raises(ConfigError, match="JWT_ALGORITHMS"):
        load_settings()


def test_algorithms_must_fit_the_configured_key_source() -> None:
    with pytest.raises(ConfigError, match="no algorithm usable with JWT_SECRET_KEY"):
        load_settings(jwt_secret_key=SECRET, jwt_algorithms="RS256,ES256")
    with pytest.raises(ConfigError, match="no algorithm usable with JWT_JWKS_URL"):
        load_settings(
            jwt_jwks_url="https://idp/jwks.json",
            jwt_issuer="https://idp",
            jwt_audience="api",
            jwt_algorithms="HS256",
        )


def test_effective_algorithms_never_mix_key_sources() -> None:
    configured = ["HS256", "RS256", "ES256"]
    assert effective_algorithms(configured, has_secret=True, has_jwks=False) == {"HS256"}
    # Only a JWKS: HS256 is dropped, so a token signed with the public key as an HMAC secret
    # is refused before any key is looked at (algorithm confusion).
    assert effective_algorithms(configured, has_secret=False, has_jwks=True) == {"RS256", "ES256"}
    assert effective_algorithms(["none", "HS256"], has_secret=True, has_jwks=True) == {"HS256"}
