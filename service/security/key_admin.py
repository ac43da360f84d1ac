"""Issuing and revoking API keys outside a request: the CLI's commands and ``make run``'s key.

Each call opens the database for itself and disposes of it, so a short-lived process needs no
lifespan.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from service.db import Database
from service.security.api_keys import ApiKeyRepository
from service.security.models import ApiKey
from service.security.principal import owner_id_from
from service.settings import Settings


async def issue_api_key(
    settings: Settings, owner: str, scopes: list[str], name: str, expires_days: int | None
) -> tuple[str, ApiKey]:
    """A new key for ``owner``: its plaintext (shown once, never stored) and its row."""
    database = Database(settings)
    expires_at = (
        datetime.now(UTC) + timedelta(days=expires_days) if expires_days is not None else None
    )
    try:
        async for session in database.session():
            plaintext, key = await ApiKeyRepository(session).create(
                owner_id=owner_id_from(owner), scopes=scopes, name=name, expires_at=expires_at
            )
    finally:
        await database.dispose()
    return plaintext, key


async def revoke_api_key(settings: Settings, prefix: str) -> bool:
    """Revoke the active key with this prefix; False when there is none."""
    database = Database(settings)
    try:
        async for session in database.session():
            revoked = await ApiKeyRepository(session).revoke(prefix)
    finally:
        await database.dispose()
    return revoked


def describe_new_key(key: ApiKey, scopes: list[str]) -> str:
    return f"created key {key.prefix} for owner {key.owner_id} scopes {','.join(scopes)}"
