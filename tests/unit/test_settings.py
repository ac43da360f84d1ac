"""Settings: parsing, normalisation, production guards, secrets directory, check-config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import (
    ConfigError,
    Settings,
    load_settings,
    mask_url,
    normalise_database_url,
)

LONG_SECRET = "s" * 40


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        prefixes = ("DATABASE_", "GATEWAY_", "JWT_", "SQLALCHEMY_", "RATE_LIMIT", "SECRETS")
        if name.startswith(prefixes):
            monkeypatch.delenv(name, raising=False)
    for name in ("ENVIRONMENT", "DEBUG", "LOG_LEVEL", "CORS_ORIGINS", "REDIS_URL", "SENTRY_DSN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env.* files


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@db.neon.tech/app", "postgresql+asyncpg://u:p@db.neon.tech/app"),
        ("postgresql://u:p@h:5432/app", "postgresql+asyncpg://u:p@h:5432/app"),
        ("postgresql+asyncpg://u:p@h/app", "postgresql+asyncpg://u:p@h/app"),
        (
            "postgres://u:p@ep-x-pooler.neon.tech/neondb?sslmode=require&channel_binding=require",
            "postgresql+asyncpg://u:p@ep-x-pooler.neon.tech/neondb?ssl=require",
        ),
    ],
)
def test_database_urls_from_hosting_providers_are_normalised(given: str, expected: str) -> None:
    assert normalise_database_url(given) == expected
    settings = load_settings(database_url=given)
    assert settings.require_database_url() == expected


@pytest.mark.parametrize("bad", ["mysql://u:p@h/db", "postgresql://u:p@h", "not a url"])
def test_bad_database_url_names_the_variable(bad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", bad)
    with pytest.raises(ConfigError) as error:
        load_settings()
    message = str(error.value)
    assert message.startswith("invalid configuration: DATABASE_URL:")
    assert "\n" not in message


def test_environment_variables_are_read_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQLALCHEMY_POOL_SIZE", "12")
    monkeypatch.setenv("DATABASE_POOL_MODE", "pgbouncer-transaction")
    monkeypatch.setenv("CORS_ORIGINS", "https://a.example, https://b.example")
    settings = load_settings()
    assert settings.sqlalchemy_pool_size == 12
    assert settings.database_pool_mode == "pgbouncer-transaction"
    assert settings.cors_origins == ["https://a.example", "https://b.example"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SQLALCHEMY_POOL_SIZE", "lots"),
        ("SQLALCHEMY_POOL_SIZE", "0"),
        ("DATABASE_POOL_MODE", "session"),
        ("ENVIRONMENT", "prod"),
        ("LOG_LEVEL", "LOUD"),
        ("CORS_ORIGINS", "*"),
        ("PORT", "70000"),
    ],
)
def test_each_bad_value_stops_start_up_with_one_line(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert name in str(error.value)
    assert "\n" not in str(error.value)


def _production(**overrides: object) -> dict[str, object]:
    values: dict[str, object] = {
        "environment": "production",
        "database_url": "postgresql://u:p@h/app?sslmode=require",
        "gateway_shared_secret": LONG_SECRET,
    }
    values.update(overrides)
    return values


def test_production_accepts_a_complete_configuration() -> None:
    settings = load_settings(**_production())
    assert settings.show_docs is False
    assert settings.resolved_log_format == "json"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"debug": True}, "DEBUG"),
        ({"database_url": None}, "DATABASE_URL"),
        ({"gateway_shared_secret": None}, "GATEWAY_SHARED_SECRET"),
        ({"gateway_shared_secret": "short"}, "GATEWAY_SHARED_SECRET"),
        ({"jwt_secret_key": "too-short-for-hs256"}, "JWT_SECRET_KEY"),
    ],
)
def test_production_refuses_unsafe_configuration(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(**_production(**overrides))
    assert needle in str(error.value)


def test_production_without_gateway_needs_explicit_opt_out() -> None:
    settings = load_settings(**_production(gateway_shared_secret=None, gateway_required=False))
    assert settings.gateway_shared_secret is None


def test_secrets_directory_is_read_like_a_mounted_kubernetes_secret(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "DATABASE_URL").write_text("postgres://u:mounted@h/app?sslmode=require\n")
    (secrets_dir / "GATEWAY_SHARED_SECRET").write_text(LONG_SECRET)
    settings = load_settings(secrets_dir=str(secrets_dir), environment="production")
    assert settings.require_database_url() == "postgresql+asyncpg://u:mounted@h/app?ssl=require"
    assert settings.gateway_shared_secret is not None
    assert settings.gateway_shared_secret.get_secret_value() == LONG_SECRET


def test_environment_beats_the_secrets_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "DATABASE_URL").write_text("postgres://u:file@h/app")
    monkeypatch.setenv("DATABASE_URL", "postgres://u:env@h/app")
    settings = load_settings(secrets_dir=str(tmp_path))
    assert "u:env@" in settings.require_database_url()


def test_missing_secrets_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SECRETS_DIR"):
        load_settings(secrets_dir=str(tmp_path / "absent"))


def test_env_file_for_the_environment_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env.staging").write_text("SQLALCHEMY_POOL_SIZE=17\n")
    monkeypatch.setenv("ENVIRONMENT", "staging")
    assert load_settings().sqlalchemy_pool_size == 17


def test_masked_configuration_hides_every_secret() -> None:
    settings = load_settings(
        database_url="postgresql://app:hunter2-password@h/app",
        jwt_secret_key=LONG_SECRET,
        redis_url="redis://:redis-pass@h:6379/0",
    )
    shown = json.dumps(settings.masked())
    for secret in ("hunter2-password", LONG_SECRET, "redis-pass"):
        assert secret not in shown
    assert settings.masked()["DATABASE_URL"] == "postgresql+asyncpg://app:***@h/app"
    assert "hunter2-password" in settings.secret_values()


def test_mask_url_without_password_is_unchanged() -> None:
    assert mask_url("postgresql://h/app") == "postgresql://h/app"


def _check_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "GATEWAY_"))}
    return subprocess.run(
        [sys.executable, "-m", "service", "check-config"],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_prints_masked_configuration() -> None:
    result = _check_config({"DATABASE_URL": "postgres://app:topsecret-pw@db/app"})
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["DATABASE_URL"] == "postgresql+asyncpg://app:***@db/app"
    assert "topsecret-pw" not in result.stdout


def test_check_config_fails_on_invalid_configuration() -> None:
    result = _check_config({"ENVIRONMENT": "production", "DEBUG": "true"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "DEBUG" in result.stderr


@pytest.mark.parametrize(("cpus", "workers"), [(1, 2), (4, 4), (96, 64)])
def test_default_workers_follow_usable_cpus_within_bounds(
    cpus: int, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)))
    # A host with more CPUs than the setting allows still starts, with the maximum.
    assert Settings(_env_file=None).web_concurrency == workers
