"""TLS settings: sslmode in the URL, CA and client files, and production's plaintext refusal."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from service.dbtls import TlsFiles, asyncpg_ssl, is_local_host, url_hosts, url_ssl_mode
from service.settings import ConfigError, load_settings

SECRET = "g" * 40


def production(**overrides: object) -> dict[str, object]:
    return {"environment": "production", "gateway_shared_secret": SECRET, **overrides}


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p@db.internal:5432/app",
        "postgresql://u:p@db.internal/app?sslmode=prefer",
        "postgresql://u:p@db.internal/app?sslmode=disable",
        "postgresql://u:p@10.0.0.5/app?sslmode=allow",
    ],
)
def test_production_refuses_a_remote_url_without_tls(url: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(**production(database_url=url))
    message = str(error.value)
    assert "DATABASE_URL reaches" in message
    assert "without TLS" in message
    assert "DATABASE_PLAINTEXT_ALLOWED_HOSTS" in message
    assert ":p@" not in message  # never the password


@pytest.mark.parametrize(
    "field", ["database_read_url", "database_migration_url", "restore_drill_database_url"]
)
def test_every_database_url_is_checked(field: str) -> None:
    with pytest.raises(ConfigError, match=field.upper()):
        load_settings(
            **production(
                database_url="postgresql://u:p@db/app?sslmode=require",
                **{field: "postgresql://u:p@other-host/app"},
            )
        )


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p@db.internal/app?sslmode=require",
        "postgres://u:p@ep-x.neon.tech/app?sslmode=require&channel_binding=require",
        "postgresql://u:p@127.0.0.1/app",
        "postgresql://u:p@localhost/app",
        "postgresql://u:p@[::1]/app",
        "postgresql://u:p@/app?host=/var/run/postgresql",
    ],
)
def test_production_accepts_tls_or_local_urls(url: str) -> None:
    assert load_settings(**production(database_url=url)).database_url is not None


def test_an_allowed_host_may_be_plaintext_and_only_that_host() -> None:
    allowed = production(
        database_url="postgresql://u:p@demo-pgbouncer:6432/app",
        database_plaintext_allowed_hosts="demo-pgbouncer",
    )
    assert load_settings(**allowed).database_plaintext_allowed_hosts == ["demo-pgbouncer"]
    with pytest.raises(ConfigError, match=r"DATABASE_MIGRATION_URL reaches postgres\.db"):
        load_settings(**allowed, database_migration_url="postgresql://u:p@postgres.db/app")


def test_other_environments_allow_plaintext() -> None:
    settings = load_settings(environment="staging", database_url="postgresql://u:p@db/app")
    assert settings.database_url is not None


def test_an_unknown_sslmode_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="unknown sslmode 'verify_full'"):
        load_settings(database_url="postgresql://u:p@db/app?sslmode=verify_full")


def test_verifying_modes_need_a_ca_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sslmode=verify-full needs DATABASE_SSL_ROOT_CERT"):
        load_settings(database_url="postgresql://u:p@db/app?sslmode=verify-full")
    with pytest.raises(ConfigError, match=r"DATABASE_SSL_ROOT_CERT: .* is not a file"):
        load_settings(database_ssl_root_cert=str(tmp_path / "missing.crt"))
    with pytest.raises(ConfigError, match="go together"):
        (tmp_path / "client.crt").write_text("x")
        load_settings(database_ssl_cert=str(tmp_path / "client.crt"))


def test_sslmode_meanings() -> None:
    assert url_ssl_mode("postgresql+asyncpg://u@h/app?ssl=verify-full") == "verify-full"
    assert url_ssl_mode("postgresql://u@h/app?sslmode=require") == "require"
    assert url_ssl_mode("postgresql://u@h/app") is None
    url, context = asyncpg_ssl("postgresql://u@h/app?sslmode=require&x=1", TlsFiles())
    assert url == "postgresql://u@h/app?x=1"
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_NONE  # libpq's require: encrypted, not verified
    assert asyncpg_ssl("postgresql://u@h/app?sslmode=prefer", TlsFiles())[1] == "prefer"
    assert asyncpg_ssl("postgresql://u@h/app", TlsFiles())[1] is None


def test_local_hosts() -> None:
    assert all(is_local_host(h) for h in ("localhost", "127.0.0.1", "127.8.0.1", "::1", "/tmp", ""))
    assert not any(is_local_host(h) for h in ("db", "10.0.0.1", "localhost.evil.example"))
    assert url_hosts("postgresql://u@a:5432/app?host=b,c") == ["a", "b", "c"]


def test_empty_paths_and_urls_from_an_env_file_mean_unset() -> None:
    settings = load_settings(
        pg_bin_dir="", backup_dir="", database_ssl_root_cert="", pushgateway_url="",
        backup_s3_bucket="",
    )  # fmt: skip
    assert settings.pg_bin_dir is None
    assert settings.backup_dir is None
    assert settings.database_ssl_root_cert is None
    assert settings.pushgateway_url is None
    assert settings.backup_s3_bucket is None
