"""API keys: minting, hashing, revocation, and a lookup that costs no round trip once warm.

A key looks like ``fa_<prefix>_<secret>``: the 12-character prefix is public (it is what logs,
the CLI and the database index use), the 43-character secret is 256 random bits. Only the
SHA-256 of the whole key is stored. A slow password hash buys nothing for a 256-bit random
secret (nobody can enumerate it) and would add milliseconds to every cache miss.

Verified keys are cached per process for ``API_KEY_CACHE_TTL_SECONDS`` (default 30 s): a revoked
or expired key stops working within that time on every replica (expiry itself is checked on
every request against the cached timestamp, so it is exact). Each cache refresh also records
``last_used_at`` in the same single statement, but only when the presented secret is the key's
own: the prefix is public (it is in every access line), so a guess at the secret must not mark
the key as used.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.errors import ForbiddenError, UnauthorizedError
from service.security.models import ApiKey
from service.security.principal import Principal, Scope

KEY_MARKER = "fa"
PREFIX_LENGTH = 12
_PREFIX_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
CACHE_MAX_ENTRIES = 10_000
# fa_ + 12-character prefix + _ + 43-character secret is 59; anything much longer is no key of ours
# and is refused before it is hashed or looked up.
MAX_KEY_LENGTH = 128

log = structlog.get_logger("service.security.api_keys")


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def looks_like_api_key(credential: str) -> bool:
    return credential.startswith(f"{KEY_MARKER}_") and credential.count("_") >= 2


def split_key(plaintext: str) -> tuple[str, str] | None:
    """(prefix, secret) of a well-formed key, else None."""
    if len(plaintext) > MAX_KEY_LENGTH:
        return None
    marker, _, rest = plaintext.partition("_")
    prefix, _, secret = rest.partition("_")
    if marker != KEY_MARKER or len(prefix) != PREFIX_LENGTH or len(secret) < 32:
        return None
    return prefix, secret


def mint_key() -> tuple[str, str]:
    """A fresh (prefix, plaintext) pair."""
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))
    return prefix, f"{KEY_MARKER}_{prefix}_{secrets.token_urlsafe(32)}"


def parse_scopes(raw: str) -> list[str]:
    scopes = sorted({item.strip() for item in raw.split(",") if item.strip()})
    valid = {scope.value for scope in Scope}
    unknown = [scope for scope in scopes if scope not in valid]
    if unknown or not scopes:
        raise ValueError(f"scopes must be a comma list of {', '.join(sorted(valid))}")
    return scopes


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    """What the cache keeps of a key row: enough to authorise without the database."""

    prefix: str
    key_hash: str
    owner_id: uuid.UUID
    scopes: frozenset[str]
    expires_at: datetime | None
    revoked: bool


class ApiKeyRepository:
    """Queries on ``api_keys``; knows nothing of HTTP."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def create(
        self,
        *,
        owner_id: uuid.UUID,
        scopes: list[str],
        name: str = "",
        expires_at: datetime | None = None,
    ) -> tuple[str, ApiKey]:
        prefix, plaintext = mint_key()
        key = ApiKey(
            prefix=prefix,
            key_hash=hash_key(plaintext),
            owner_id=owner_id,
            name=name,
            scopes=scopes,
            expires_at=expires_at,
        )
        self.session.add(key)
        await self.session.flush()
        return plaintext, key

    async def revoke(self, prefix: str) -> bool:
        result = await self.session.execute(
            update(ApiKey)
            .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
            .values(revoked_at=func.now())
            .returning(ApiKey.id)
        )
        return result.first() is not None

    async def get_and_stamp(self, prefix: str, key_hash: str) -> tuple[ApiKey | None, bool]:
        """The key with this prefix, and whether ``last_used_at`` was stamped: one statement.

        Only a usable key (not revoked, not expired) whose hash is ``key_hash`` is stamped; the
        row comes back either way, so the caller can cache it.
        """
        stamped = (
            update(ApiKey)
            .where(ApiKey.prefix == prefix, ApiKey.key_hash == key_hash, *_usable())
            .values(last_used_at=func.now())
            .returning(ApiKey.id)
            .cte("stamped")
        )
        statement = select(
            ApiKey, select(func.count()).select_from(stamped).scalar_subquery()
        ).where(ApiKey.prefix == prefix)
        row = (await self.session.execute(statement)).first()
        if row is None:
            return None, False
        return row[0], bool(row[1])

    async def stamp(self, prefix: str, key_hash: str) -> None:
        await self.session.execute(
            update(ApiKey)
            .where(ApiKey.prefix == prefix, ApiKey.key_hash == key_hash, *_usable())
            .values(last_used_at=func.now())
        )


def _usable() -> tuple[ColumnElement[bool], ...]:
    return (
        ApiKey.revoked_at.is_(None),
        or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > func.now()),
    )


@dataclass(slots=True)
class _CacheEntry:
    loaded_at: float
    snapshot: KeySnapshot | None
    # Whether last_used_at was recorded since this entry was loaded. An entry loaded for a
    # request with a wrong secret was not, and the first verified request records it.
    stamped: bool


class ApiKeyAuthenticator:
    """Turns a presented key into a Principal, with a bounded per-process TTL cache."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        ttl_seconds: float,
        connect: Callable[[AsyncSession], Awaitable[None]] | None = None,
        max_entries: int = CACHE_MAX_ENTRIES,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._ttl = ttl_seconds
        # Bounded so that a flood of made-up prefixes cannot grow memory without limit.
        self._max_entries = max_entries
        # Database.connect_session in the app: retried and bounded by DATABASE_CONNECT_TIMEOUT,
        # so with the database down a cache miss is a quick 503, not a wait on the pool.
        self._connect = connect
        self._cache: OrderedDict[str, _CacheEntry] = OrderedDict()
        self._loading: dict[tuple[str, str], asyncio.Future[_CacheEntry]] = {}

    async def _entry(self, prefix: str, key_hash: str) -> _CacheEntry:
        cached = self._cache.get(prefix)
        if cached is not None and time.monotonic() - cached.loaded_at < self._ttl:
            self._cache.move_to_end(prefix)
            return cached
        # Single flight: when a busy key's entry expires, the concurrent requests share one
        # query instead of queueing on the same row's lock with one UPDATE each. Per presented
        # secret too, so that a request with a wrong one never decides for a right one.
        flight = (prefix, key_hash)
        loading = self._loading.get(flight)
        if loading is None:
            loading = asyncio.ensure_future(self._load(prefix, key_hash))
            self._loading[flight] = loading
            loading.add_done_callback(lambda _: self._loading.pop(flight, None))
        return await asyncio.shield(loading)

    async def _load(self, prefix: str, key_hash: str) -> _CacheEntry:
        now = time.monotonic()
        async with self._sessionmaker() as session:
            if self._connect is not None:
                await self._connect(session)
            row, stamped = await ApiKeyRepository(session).get_and_stamp(prefix, key_hash)
            await session.commit()
        snapshot = (
            None
            if row is None
            else KeySnapshot(
                prefix=row.prefix,
                key_hash=row.key_hash,
                owner_id=row.owner_id,
                scopes=frozenset(row.scopes),
                expires_at=row.expires_at,
                revoked=row.revoked_at is not None,
            )
        )
        entry = _CacheEntry(now, snapshot, stamped)
        if self._ttl > 0:
            self._cache[prefix] = entry
            self._cache.move_to_end(prefix)
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return entry

    async def _stamp(self, entry: _CacheEntry, prefix: str, key_hash: str) -> None:
        entry.stamped = True
        try:
            async with self._sessionmaker() as session:
                if self._connect is not None:
                    await self._connect(session)
                await ApiKeyRepository(session).stamp(prefix, key_hash)
                await session.commit()
        except Exception as exc:
            # Bookkeeping: the request is authenticated either way; the next refresh retries.
            entry.stamped = False
            log.warning("api_key_stamp_failed", prefix=prefix, error_type=type(exc).__name__)

    async def authenticate(self, plaintext: str) -> Principal:
        parts = split_key(plaintext)
        if parts is None:
            raise UnauthorizedError("Malformed API key")
        prefix, presented = parts[0], hash_key(plaintext)
        entry = await self._entry(prefix, presented)
        snapshot = entry.snapshot
        # Compare even when the prefix is unknown so both failures take the same time.
        expected = snapshot.key_hash if snapshot is not None else hash_key("")
        if not hmac.compare_digest(expected, presented) or snapshot is None:
            raise UnauthorizedError("Invalid API key")
        if snapshot.revoked:
            raise UnauthorizedError("API key revoked")
        if snapshot.expires_at is not None and snapshot.expires_at <= datetime.now(UTC):
            raise UnauthorizedError("API key expired")
        if not entry.stamped:
            await self._stamp(entry, prefix, presented)
        return Principal(
            owner_id=snapshot.owner_id,
            scopes=snapshot.scopes,
            auth_method="api_key",
            credential_id=snapshot.prefix,
        )


def require(principal: Principal, scope: str) -> Principal:
    if not principal.has_scope(scope):
        # RFC 6750 section 3.1: name the scope the caller would need.
        raise ForbiddenError(
            f"This credential lacks the '{scope}' scope",
            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
        )
    return principal
