"""PgBouncer's admin console (``SHOW STATS``, ``SHOW POOLS`` …) for the tests and the stack.

The console speaks only the simple query protocol, which asyncpg uses for commands without
rows; psql reads its answers. psql is the system one, else the embedded PostgreSQL's.
"""

from __future__ import annotations

import os
import subprocess

from tools.kit import find_binary


def psql_binary() -> str:
    found = find_binary("psql")
    if found:
        return found
    from service.tools.embedded_postgres import binaries_dir

    return str(binaries_dir() / "psql")


def show(port: int, user: str, password: str, command: str) -> list[dict[str, str]]:
    """The rows of an admin console ``command``, one dict per row by column name."""
    result = subprocess.run(
        [
            psql_binary(),
            *("-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", "pgbouncer"),
            *("-A", "-F", "\t", "-P", "footer=off", "-c", command),
        ],
        env={**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "5"},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pgbouncer console {command!r}: {result.stderr.strip()}")
    lines = result.stdout.splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]
