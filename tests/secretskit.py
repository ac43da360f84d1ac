"""Settings that carry a known value in every secret, for the tests that check none of them
leaks (log redaction, Sentry scrubbing)."""

from __future__ import annotations

from typing import Any

from service.settings import Settings, load_settings

GATEWAY = "g" * 40
JWT_SECRET = "jwt-secret-0123456789-abcdefghijklmnop"
DB_PASSWORD = "db-pass-0123456789"
API_KEY = "fa_abcdefghijkl_" + "S3cr3tPart" * 4


def settings_with_secrets(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "gateway_shared_secret": GATEWAY,
        "jwt_secret_key": JWT_SECRET,
        "database_url": f"postgresql://app:{DB_PASSWORD}@db:5432/app",
    }
    values.update(overrides)
    return load_settings(**values)
