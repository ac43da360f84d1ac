#!/usr/bin/env python3
"""Render a runnable PgBouncer configuration from pgbouncer/pgbouncer.ini.

    python pgbouncer/render.py --out /tmp/pgb \
        --database-url postgresql://app:secret@127.0.0.1:5432/app --listen-port 6432
    pgbouncer /tmp/pgb/pgbouncer.ini          # as a non-root user: PgBouncer refuses root

Every pooling, timeout and auth_type setting comes from the shipped pgbouncer.ini; only what is
specific to this machine is replaced: the [databases] entry, listen address/port, and pidfile,
log and Unix socket inside the output directory. Authentication uses SCRAM against a userlist
(DIR/userlist.txt, mode 0600) holding the database user and the console users, instead of
auth_query (which needs a function created by a superuser; see the ini). Standard library only.
"""

from __future__ import annotations

import argparse
import configparser
import io
import os
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

HERE = Path(__file__).resolve().parent
SHIPPED_INI = HERE / "pgbouncer.ini"

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,62}$")
_HOST = re.compile(r"^[A-Za-z0-9_.:/-]+$")
_PASSWORD = re.compile(r"^[^\"\s]{1,200}$")


class RenderError(ValueError):
    """An argument that cannot be written into pgbouncer.ini or userlist.txt safely."""


@dataclass
class Upstream:
    """The PostgreSQL server behind PgBouncer, and the name clients use for it."""

    host: str
    port: int
    dbname: str
    user: str
    password: str
    alias: str = ""

    @classmethod
    def from_url(cls, url: str, alias: str = "") -> Upstream:
        """postgresql[+driver]://user:password@host:port/dbname"""
        parts = urlsplit(url)
        if not parts.scheme.startswith("postgres"):
            raise RenderError(f"not a PostgreSQL URL: {parts.scheme}://...")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            dbname=unquote(parts.path.lstrip("/")) or "postgres",
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            alias=alias,
        )

    def validate(self) -> None:
        for label, value in (("dbname", self.dbname), ("user", self.user), ("alias", self.name)):
            if not _NAME.match(value):
                raise RenderError(f"{label} {value!r} is not a plain identifier")
        if not _HOST.match(self.host):
            raise RenderError(f"host {self.host!r} is not a host name or address")
        if not _PASSWORD.match(self.password):
            raise RenderError("the password must be 1-200 characters without quotes or spaces")

    @property
    def name(self) -> str:
        return self.alias or self.dbname


@dataclass
class Rendered:
    directory: Path
    ini: Path
    userlist: Path
    listen_port: int
    database: str
    admin_user: str
    admin_password: str
    settings: dict[str, str] = field(default_factory=dict)
    replica_database: str | None = None

    def client_url(
        self, user: str, password: str, scheme: str = "postgresql", database: str | None = None
    ) -> str:
        name = database or self.database
        return f"{scheme}://{user}:{password}@127.0.0.1:{self.listen_port}/{name}"


def read_shipped(path: Path = SHIPPED_INI) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=(";", "#"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep key case
    parser.read_string(path.read_text())
    return parser


def installed_version(binary: str = "pgbouncer") -> tuple[int, int, int] | None:
    """(major, minor, patch) of the installed pgbouncer, or None when it is not installed."""
    try:
        output = subprocess.run(  # noqa: S603 - the pgbouncer binary, fixed arguments
            [binary, "--version"], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return None
    match = re.search(r"PgBouncer (\d+)\.(\d+)\.(\d+)", output)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


# As the chart's pgbouncer.maxPreparedStatements: far above the statements the app prepares.
MAX_PREPARED_STATEMENTS = "200"
PREPARED_STATEMENTS_SINCE = (1, 21, 0)


def tracks_prepared_statements(binary: str = "pgbouncer") -> bool:
    """Whether ``binary`` can track prepared statements (max_prepared_statements, >= 1.21)."""
    version = installed_version(binary)
    return version is not None and version >= PREPARED_STATEMENTS_SINCE


def _userlist_line(user: str, password: str) -> str:
    return f'"{user}" "{password}"\n'


def render(
    out: Path,
    upstream: Upstream,
    *,
    listen_port: int,
    listen_addr: str = "127.0.0.1",
    admin_user: str = "pgbouncer_admin",
    admin_password: str | None = None,
    overrides: dict[str, str] | None = None,
    replica: Upstream | None = None,
    prepared_statements: bool = False,
) -> Rendered:
    """Write DIR/pgbouncer.ini and DIR/userlist.txt; returns where clients connect.

    With ``replica``, PgBouncer fronts it too, under the replica's alias (its own pool). With
    ``prepared_statements`` (PgBouncer >= 1.21 only), it tracks prepared statements, for the
    app's ``pgbouncer-prepared`` mode.
    """
    upstream.validate()
    if replica is not None:
        replica.validate()
        if replica.name == upstream.name:
            raise RenderError("the replica needs a database name (alias) of its own")
    if not _NAME.match(admin_user):
        raise RenderError(f"admin user {admin_user!r} is not a plain identifier")
    admin_password = admin_password or secrets.token_urlsafe(18)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    config = read_shipped()
    config.remove_section("databases")
    config.add_section("databases")
    config.set(
        "databases",
        upstream.name,
        f"host={upstream.host} port={upstream.port} dbname={upstream.dbname}",
    )
    if replica is not None:
        config.set(
            "databases",
            replica.name,
            f"host={replica.host} port={replica.port} dbname={replica.dbname}",
        )
    section = config["pgbouncer"]
    userlist = out / "userlist.txt"
    local = {
        "listen_addr": listen_addr,
        "listen_port": str(listen_port),
        "unix_socket_dir": str(out),
        "pidfile": str(out / "pgbouncer.pid"),
        "logfile": str(out / "pgbouncer.log"),
        "auth_file": str(userlist),
        "admin_users": admin_user,
        "stats_users": admin_user,
    }
    if prepared_statements:
        local["max_prepared_statements"] = MAX_PREPARED_STATEMENTS
    for key, value in (overrides or {}).items():
        if not re.fullmatch(r"[a-z_]+", key) or "\n" in value or "\r" in value:
            raise RenderError(f"cannot override {key!r} with {value!r}")
        local[key] = value
    for key, value in local.items():
        section[key] = value
    # Users come from the userlist here; auth_query needs a superuser-made function.
    for key in ("auth_user", "auth_query"):
        section.pop(key, None)

    ini = out / "pgbouncer.ini"
    buffer = io.StringIO()
    buffer.write(f";; rendered by pgbouncer/render.py from {SHIPPED_INI.name}; do not edit\n")
    config.write(buffer)
    ini.write_text(buffer.getvalue())
    ini.chmod(0o644)

    userlist.write_text(
        _userlist_line(upstream.user, upstream.password)
        + _userlist_line(admin_user, admin_password)
    )
    userlist.chmod(0o600)
    return Rendered(
        directory=out,
        ini=ini,
        userlist=userlist,
        listen_port=listen_port,
        database=upstream.name,
        admin_user=admin_user,
        admin_password=admin_password,
        settings=dict(section),
        replica_database=replica.name if replica is not None else None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_MIGRATION_URL") or os.environ.get("DATABASE_URL"),
        help="the real PostgreSQL (default: $DATABASE_MIGRATION_URL, else $DATABASE_URL)",
    )
    parser.add_argument("--alias", default="", help="database name clients use (default: same)")
    parser.add_argument("--listen-port", type=int, default=6432)
    parser.add_argument("--listen-addr", default="127.0.0.1")
    parser.add_argument("--admin-user", default="pgbouncer_admin")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    parser.add_argument(
        "--prepared-statements",
        action="store_true",
        help="track prepared statements (PgBouncer >= 1.21; app mode pgbouncer-prepared)",
    )
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("--database-url (or DATABASE_URL) is required")
    overrides = dict(item.split("=", 1) for item in args.set)
    try:
        rendered = render(
            args.out,
            Upstream.from_url(args.database_url, args.alias),
            listen_port=args.listen_port,
            listen_addr=args.listen_addr,
            admin_user=args.admin_user,
            overrides=overrides,
            prepared_statements=args.prepared_statements,
        )
    except RenderError as error:
        print(f"render.py: {error}", file=sys.stderr)
        return 2
    print(rendered.ini)
    print(
        f"admin console: psql -h 127.0.0.1 -p {rendered.listen_port} "
        f"-U {rendered.admin_user} pgbouncer"
    )
    print(f"admin password is in {rendered.userlist}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
