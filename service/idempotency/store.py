"""``Idempotency-Key`` (IETF httpapi idempotency-key draft), kept in PostgreSQL.

A retried request must not create a second task, so the first response is stored in the same
transaction as the write it describes: either both are committed or neither is. Concurrent
requests with one key are serialised by a transaction-level advisory lock, which works through
PgBouncer in transaction pooling mode because it lives and dies with the transaction:

1. ``pg_try_advisory_xact_lock(hash(owner, key))``; not acquired means another request with
   this key is still running: 409, retry later.
2. Look the key up. Stored and the same request: replay the stored response. Stored and a
   different request (method, path or body): 422.
3. Otherwise the caller does the work, ``save`` stores the response, and the commit publishes
   both and releases the lock. PostgreSQL makes a transaction visible before it releases its
   locks, so the next holder of the lock always sees the record.

Records live ``IDEMPOTENCY_TTL_HOURS`` (at least 24 h). Expired ones are ignored by the lookup,
overwritten when their key is reused, and deleted in small batches by the requests that store
new records (about one in ``purge_every``), so the table needs no cron job;
``IdempotencyStore.purge_expired`` is also there to run by hand.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import orjson
from sqlalchemy import BigInteger, Integer, Interval, Table, bindparam, delete, func, select, tuple_
from sqlalchemy.dialects.postgresql import insert

from service.db import Transaction
from service.errors import ConflictError, UnprocessableError
from service.idempotency.models import IdempotencyRecord

records = cast(Table, IdempotencyRecord.__table__)

KEY_MAX_LENGTH = 255
PURGE_BATCH = 500

# Built once: SQLAlchemy then computes each statement's cache key once, not per request (building
# and keying the three statements was a sixth of a POST's CPU in the profile).
LOCK = select(func.pg_try_advisory_xact_lock(bindparam("lock_id", type_=BigInteger)))
LOOKUP = select(
    records.c.request_hash,
    records.c.status_code,
    records.c.response_body,
    records.c.response_headers,
).where(
    records.c.owner_id == bindparam("owner_id"),
    records.c.key == bindparam("key"),
    records.c.expires_at > func.now(),
)
RECORD_FIELDS = (
    "method",
    "path",
    "request_hash",
    "status_code",
    "response_body",
    "response_headers",
    "created_at",
    "expires_at",
)
"""What a record stores for its key (``owner_id``, ``key``)."""

_saved = insert(records).values(
    owner_id=bindparam("owner_id"),
    key=bindparam("key"),
    method=bindparam("method"),
    path=bindparam("path"),
    request_hash=bindparam("request_hash"),
    status_code=bindparam("status_code"),
    response_body=bindparam("response_body", type_=records.c.response_body.type),
    response_headers=bindparam("response_headers", type_=records.c.response_headers.type),
    created_at=func.now(),
    expires_at=func.now() + bindparam("ttl", type_=Interval),
)
# A row can only already exist here if it has expired (claim() would have replayed or refused it
# otherwise): reuse the key, with everything the new request stores.
SAVE = _saved.on_conflict_do_update(
    index_elements=[records.c.owner_id, records.c.key],
    set_={name: getattr(_saved.excluded, name) for name in RECORD_FIELDS},
)


_expired = (
    select(records.c.owner_id, records.c.key)
    .where(records.c.expires_at < func.now())
    .limit(bindparam("batch", type_=Integer))
    .with_for_update(skip_locked=True)
)
PURGE = (
    delete(records)
    .where(tuple_(records.c.owner_id, records.c.key).in_(_expired))
    .returning(records.c.key)
)


class IdempotencyKeyInUseError(ConflictError):
    slug, title = "idempotency-key-in-use", "Request in progress"

    def __init__(self) -> None:
        super().__init__(
            "A request with this Idempotency-Key is still being processed; retry shortly",
            headers={"Retry-After": "1"},
        )


class IdempotencyKeyReusedError(UnprocessableError):
    slug, title = "idempotency-key-reused", "Idempotency-Key reused"

    def __init__(self) -> None:
        super().__init__(
            "This Idempotency-Key was already used for a different request; use a new key"
        )


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status_code: int
    body: Any
    headers: dict[str, str]


def parse_idempotency_key(raw: str) -> str | None:
    """The key from the header, or ``None`` when it is not a valid one.

    The draft defines the field as a Structured Field string (``"abc"``); the bare form
    (``abc``) that most clients send is accepted as well. Either way the key is 1-255
    printable ASCII characters.
    """
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not 1 <= len(value) <= KEY_MAX_LENGTH:
        return None
    if not all(" " <= ch <= "~" for ch in value):
        return None
    return value


def request_fingerprint(method: str, path: str, body: Any) -> str:
    """SHA-256 of the method, path and canonical JSON of the parsed body.

    The body is hashed after validation, so requests that mean the same (key order, whitespace,
    a title with surrounding spaces) count as the same request.
    """
    digest = hashlib.sha256()
    digest.update(method.upper().encode())
    digest.update(b"\n")
    digest.update(path.encode())
    digest.update(b"\n")
    digest.update(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    return digest.hexdigest()


def advisory_lock_id(owner_id: uuid.UUID, key: str) -> int:
    """A signed 64-bit lock id for (owner, key); a collision only causes a spurious 409."""
    digest = hashlib.sha256(b"idempotency\x00" + owner_id.bytes + key.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class IdempotencyStore:
    def __init__(self, session: Transaction, *, ttl: timedelta, purge_every: int = 100) -> None:
        self.session = session
        self.ttl = ttl
        self.purge_every = purge_every

    async def claim(self, owner_id: uuid.UUID, key: str, fingerprint: str) -> StoredResponse | None:
        """Lock the key for this transaction; the stored response if it was used before.

        Raises ``IdempotencyKeyInUseError`` (409) or ``IdempotencyKeyReusedError`` (422).
        """
        locked = await self.session.scalar(LOCK, {"lock_id": advisory_lock_id(owner_id, key)})
        if not locked:
            raise IdempotencyKeyInUseError()
        # A separate statement: under READ COMMITTED its snapshot is taken after the lock was
        # acquired, so it sees the record of the request that held the lock before us.
        row = (await self.session.execute(LOOKUP, {"owner_id": owner_id, "key": key})).first()
        if row is None:
            return None
        request_hash, status_code, body, headers = row
        if request_hash != fingerprint:
            raise IdempotencyKeyReusedError()
        return StoredResponse(status_code, body, dict(headers))

    async def save(
        self,
        owner_id: uuid.UUID,
        key: str,
        *,
        method: str,
        path: str,
        fingerprint: str,
        response: StoredResponse,
    ) -> None:
        """Store the response of a claimed key in the caller's transaction."""
        values = {
            "owner_id": owner_id,
            "key": key,
            "method": method,
            "path": path,
            "request_hash": fingerprint,
            "status_code": response.status_code,
            "response_body": response.body,
            "response_headers": response.headers,
            "ttl": self.ttl,
        }
        await self.session.execute(SAVE, values)
        await self.purge_sometimes()

    async def purge_sometimes(self) -> None:
        """After storing a record: purge expired ones, about once in ``purge_every`` calls."""
        if self.purge_every <= 1 or secrets.randbelow(self.purge_every) == 0:
            await self.purge_expired()

    async def purge_expired(self, batch: int = PURGE_BATCH) -> int:
        """Delete up to ``batch`` expired records; rows locked by others are skipped."""
        result = await self.session.execute(PURGE, {"batch": batch})
        return len(result.all())
