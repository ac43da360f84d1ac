"""Row counts and per-table checksums: what a backup recorded, and what a restore must equal.

A checksum is the sum of a 60-bit slice of ``md5(row::text)`` over a table's rows: independent
of row order (a restore need not keep the physical order), computed by the server in one pass
without sorting or buffering the table. The text form of a row depends on session settings
(time zone, date style, float digits), so both sides pin them.
"""

from __future__ import annotations

import ssl
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg

from service.dbtls import TlsFiles, asyncpg_ssl

# Session settings that make row::text the same on the backed-up and the restored database.
STABLE_TEXT_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
}

_TABLES = """
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
ORDER BY 1, 2
"""


@dataclass(frozen=True)
class TableFingerprint:
    rows: int
    checksum: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def connect(url: str, tls: TlsFiles) -> asyncpg.Connection:
    """A plain asyncpg connection (no pool), TLS as configured, settings pinned."""
    dsn, ssl_argument = asyncpg_ssl(url.replace("postgresql+asyncpg://", "postgresql://", 1), tls)
    kwargs: dict[str, Any] = {"server_settings": dict(STABLE_TEXT_SETTINGS)}
    if isinstance(ssl_argument, ssl.SSLContext | str):
        kwargs["ssl"] = ssl_argument
    connection: asyncpg.Connection = await asyncpg.connect(dsn, timeout=30, **kwargs)
    return connection


async def server_major(connection: asyncpg.Connection) -> int:
    number = int(await connection.fetchval("SHOW server_version_num"))
    return number // 10000


async def fingerprints(connection: asyncpg.Connection) -> dict[str, TableFingerprint]:
    """Every user table's fingerprint, as seen by the connection's current snapshot."""
    result: dict[str, TableFingerprint] = {}
    for schema, table in await connection.fetch(_TABLES):
        relation = f"{quote_ident(schema)}.{quote_ident(table)}"
        row = await connection.fetchrow(
            "SELECT count(*) AS rows, "  # noqa: S608 - identifiers quoted from the catalog
            "coalesce(sum(('x' || substr(md5(t::text), 1, 15))::bit(60)::bigint), 0)::text "
            f"AS checksum FROM {relation} AS t"
        )
        assert row is not None
        result[f"{schema}.{table}"] = TableFingerprint(int(row["rows"]), str(row["checksum"]))
    return result
