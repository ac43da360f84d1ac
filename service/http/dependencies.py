"""Request dependencies for the database: the request's transaction and its way to read.

The ``Consistency-Token`` header is parsed here, at the edge; ``Database`` below only ever sees
the WAL position it names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.exceptions import RequestValidationError

from service.db import Database, Reads
from service.http.state import app_state
from service.replica import parse_lsn
from service.security.api_keys import require
from service.security.dependencies import authenticate
from service.security.principal import Principal, Scope
from service.write_connection import WriteConnection

CONSISTENCY_TOKEN_HEADER = "Consistency-Token"  # noqa: S105 - a header name


def get_database(request: Request) -> Database:
    return app_state(request).database


async def get_transaction(request: Request) -> AsyncIterator[WriteConnection]:
    """FastAPI dependency: the request's read-write transaction on the primary."""
    async with get_database(request).transaction() as connection:
        yield connection


CONSISTENCY_TOKEN_PATTERN = r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$"  # noqa: S105 - a pattern


def parse_consistency_token(raw: str) -> int:
    """The WAL position a ``Consistency-Token`` names; a malformed one is a 422."""
    try:
        return parse_lsn(raw.strip())
    except ValueError:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("header", CONSISTENCY_TOKEN_HEADER),
                    "msg": "must be a Consistency-Token this API returned, e.g. 0/1A2B3C4",
                    "input": raw,
                }
            ]
        ) from None


ConsistencyTokenHeader = Annotated[
    str,
    Header(
        alias=CONSISTENCY_TOKEN_HEADER,
        description="The `Consistency-Token` of your last write. Send it back and this read "
        "sees that write (and everything before it), whichever instance serves it. Without "
        "it a read may be up to DATABASE_READ_MAX_LAG_SECONDS stale, never wrong.",
        # Checked in code (422 when malformed), documented here.
        json_schema_extra={"pattern": CONSISTENCY_TOKEN_PATTERN},
        examples=["0/1A2B3C4"],
    ),
]


@dataclass(frozen=True, slots=True)
class ReadAccess:
    """Who reads (authenticated, with the read scope) and how (``Reads``)."""

    principal: Principal
    reads: Reads


async def read_access(
    request: Request,
    # A plain string schema, so the pattern applies (absent and empty: no token).
    consistency_token: ConsistencyTokenHeader = "",
) -> ReadAccess:
    """The read routes' one dependency: the credential, its scope, then the consistency token
    (so a caller without credentials gets its 401 before a malformed token's 422, as when these
    were separate dependencies; each dependency FastAPI resolves costs a read ~25 µs)."""
    principal = require(await authenticate(request), Scope.TASKS_READ.value)
    token = parse_consistency_token(consistency_token) if consistency_token else None
    return ReadAccess(principal, Reads(get_database(request), token))


TransactionDep = Annotated[WriteConnection, Depends(get_transaction, scope="function")]
"""Read-write transaction; ``scope="function"`` commits before the response is sent, so a 2xx
is only ever returned for a write that is durable."""

ReadAccessDep = Annotated[ReadAccess, Depends(read_access)]
"""The caller (scope ``tasks:read``) and its reads, in one dependency."""
