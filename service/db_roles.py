"""Least privilege: the migration role owns the schema, the app role only reads and writes rows.

``python -m service grant-app-role`` (and ``migrate``, after every upgrade, when the two URLs
name different users) runs, as the migration role, the statements below: idempotent, safe to
run on every deploy. ``ALTER DEFAULT PRIVILEGES`` makes every table and sequence the migration
role creates later usable by the app role without running this again.

What the app role gets: USAGE on the schema; SELECT, INSERT, UPDATE, DELETE on tables; USAGE
and SELECT on sequences; only SELECT on ``alembic_version`` (readiness reads it; only
``migrate`` may move it). What it does not get: CREATE on the schema (no DDL), TRUNCATE,
REFERENCES, TRIGGER, ownership of anything. Creating the roles themselves (and their
passwords) is the database administrator's job; docs/backup-restore.md has the SQL.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

from service.backup.fingerprint import connect
from service.dbtls import TlsFiles

SCHEMA = "public"
_ROLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$-]{0,62}$")


class RoleError(ValueError):
    pass


def url_user(url: str) -> str | None:
    user = urlsplit(url).username
    return unquote(user) if user else None


def _ident(name: str) -> str:
    if not _ROLE.match(name):
        raise RoleError(f"unexpected role name {name!r}")
    return '"' + name + '"'


def grant_statements(app_role: str, schema: str = SCHEMA) -> list[str]:
    app, ns = _ident(app_role), _ident(schema)
    rows = "SELECT, INSERT, UPDATE, DELETE"
    return [
        # Nobody but the owner creates objects in the schema (PostgreSQL < 15 let PUBLIC).
        f"REVOKE CREATE ON SCHEMA {ns} FROM PUBLIC",
        f"REVOKE CREATE ON SCHEMA {ns} FROM {app}",
        f"GRANT USAGE ON SCHEMA {ns} TO {app}",
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {ns} FROM {app}",
        f"GRANT {rows} ON ALL TABLES IN SCHEMA {ns} TO {app}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {ns} TO {app}",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA {ns} GRANT {rows} ON TABLES TO {app}",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA {ns} GRANT USAGE, SELECT ON SEQUENCES TO {app}",
        # The schema revision is migrate's to move; readiness only reads it.
        f"DO $$ BEGIN IF to_regclass('{schema}.alembic_version') IS NOT NULL THEN "
        f"REVOKE INSERT, UPDATE, DELETE ON {ns}.alembic_version FROM {app}; END IF; END $$",
    ]


async def grant_app_role(migration_url: str, app_role: str, tls: TlsFiles) -> list[str]:
    """Apply the grants as the migration role (the schema's owner); returns the statements."""
    owner = url_user(migration_url)
    if owner is not None and owner == app_role:
        raise RoleError(
            f"the app role and the migration role are both {app_role!r}: give the app its own "
            "role (DATABASE_URL) and keep the owner for DATABASE_MIGRATION_URL"
        )
    statements = grant_statements(app_role)
    connection = await connect(migration_url, tls)
    try:
        if not await connection.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", app_role):
            raise RoleError(f"role {app_role!r} does not exist: create it first (CREATE ROLE)")
        async with connection.transaction():
            for statement in statements:
                await connection.execute(statement)
    finally:
        await connection.close()
    return statements
