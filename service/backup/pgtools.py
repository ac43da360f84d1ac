"""The PostgreSQL client tools, run with the same URL, TLS files and version as the server.

A dump must be taken by a ``pg_dump`` of the server's major version: an older one refuses a
newer server, and a newer one writes archives an older ``pg_restore`` cannot read. So the major
versions are compared before anything runs, and a mismatch is one clear error.

Passwords never appear on a command line (``/proc/<pid>/cmdline`` is world-readable): the
tools get a conninfo without it and ``PGPASSWORD`` in their environment.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlencode, urlsplit, urlunsplit

from service.dbtls import TlsFiles, libpq_parameters, without_ssl_parameters


class BackupError(Exception):
    """A backup or drill step that failed; the message is the one line an operator reads."""


_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class Connection:
    """A database as the libpq tools see it: a password-free conninfo and an environment."""

    conninfo: str
    password: str | None
    database: str

    @classmethod
    def from_url(cls, url: str, tls: TlsFiles) -> Connection:
        parts = urlsplit(without_ssl_parameters(url))
        netloc = parts.hostname or ""
        if ":" in netloc:  # IPv6 literal
            netloc = f"[{netloc}]"
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        if parts.username:
            netloc = f"{parts.username}@{netloc}"
        query = parts.query
        extra = urlencode(libpq_parameters(url, tls))
        query = "&".join(q for q in (query, extra) if q)
        conninfo = urlunsplit(("postgresql", netloc, parts.path, query, ""))
        password = unquote(parts.password) if parts.password is not None else None
        return cls(conninfo, password, unquote(parts.path.lstrip("/")))

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        # Where the tools may look for ~/.pgpass and ~/.postgresql: nowhere surprising.
        env.setdefault("HOME", "/nonexistent")
        return env


@dataclass(frozen=True)
class PgTools:
    bin_dir: Path | None = None

    def path(self, name: str) -> str:
        if self.bin_dir is not None:
            candidate = self.bin_dir / name
            if not candidate.is_file():
                raise BackupError(f"{name} not found in PG_BIN_DIR={self.bin_dir}")
            return str(candidate)
        found = shutil.which(name)
        if found is None:
            raise BackupError(
                f"{name} not found on PATH: install the PostgreSQL client of the server's "
                "major version, or set PG_BIN_DIR"
            )
        return found

    def major_version(self, name: str) -> int:
        result = subprocess.run(  # noqa: S603 - our own binary, fixed arguments
            [self.path(name), "--version"], capture_output=True, text=True, check=False
        )
        match = _VERSION.search(result.stdout)
        if result.returncode != 0 or match is None:
            raise BackupError(f"{name} --version failed: {result.stderr.strip()[:200]}")
        return int(match.group(1))

    def require_major(self, name: str, server_major: int) -> None:
        client_major = self.major_version(name)
        if client_major != server_major:
            raise BackupError(
                f"{name} is PostgreSQL {client_major} but the server is {server_major}: use the "
                f"client tools of the server's major version (PG_BIN_DIR)"
            )

    def run(
        self, name: str, args: list[str], connection: Connection, *, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(  # noqa: S603 - our own binary; arguments are built here
                [self.path(name), *args],
                capture_output=True,
                text=True,
                env=connection.env(),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BackupError(f"{name} did not finish within {timeout:g} s") from None


def last_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The tool's last error line, which names the cause (and never holds the password)."""
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    if lines:
        return lines[-1][:300]
    if result.returncode < 0:
        return f"killed by signal {-result.returncode} without a message"
    return f"exit status {result.returncode} without a message"
