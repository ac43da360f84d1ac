"""TLS to PostgreSQL: one reading of ``sslmode`` for the app, ``migrate`` and the backup tools.

The mode travels in the database URL (``sslmode=verify-full``, stored as asyncpg's ``ssl=``);
the CA file and client certificate are settings (``DATABASE_SSL_ROOT_CERT``,
``DATABASE_SSL_CERT``, ``DATABASE_SSL_KEY``), because one CA usually serves every URL.

asyncpg gets an ``ssl.SSLContext`` built here rather than the mode string: with a string it
reads the CA from ``~/.postgresql/root.crt`` (no home directory in the image) and offers no way
to pass a client certificate. The libpq tools (pg_dump, pg_restore) get the same mode and files
as libpq parameters, so every connection the kit opens is verified the same way.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
SSL_MODES: tuple[SslMode, ...] = (
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
)
ENCRYPTED_MODES = frozenset({"require", "verify-ca", "verify-full"})
VERIFYING_MODES = frozenset({"verify-ca", "verify-full"})


class DatabaseTlsError(ValueError):
    """A TLS configuration that cannot work (unknown mode, CA file missing)."""


@dataclass(frozen=True)
class TlsFiles:
    root_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None


def url_ssl_mode(url: str) -> SslMode | None:
    """The ``ssl``/``sslmode`` of a database URL, None when it names none (asyncpg: prefer)."""
    for key, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if key in {"ssl", "sslmode"}:
            mode = value.lower()
            if mode in {"true", "on", "1"}:
                return "require"
            if mode in {"false", "off", "0"}:
                return "disable"
            if mode not in SSL_MODES:
                raise DatabaseTlsError(
                    f"unknown sslmode {value!r}; use one of {', '.join(SSL_MODES)}"
                )
            return mode
    return None


def without_ssl_parameters(url: str) -> str:
    parts = urlsplit(url)
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k not in {"ssl", "sslmode"}
    ]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def is_local_host(host: str | None) -> bool:
    """Loopback or a Unix socket: traffic that never crosses a network."""
    if not host or host.startswith("/"):
        return True
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_hosts(url: str) -> list[str]:
    """Every host a URL names: the netloc's, and libpq's ``host=`` query parameter(s)."""
    parts = urlsplit(url)
    hosts = [parts.hostname] if parts.hostname else []
    for key, value in parse_qsl(parts.query):
        if key == "host":
            hosts.extend(h for h in value.split(",") if h)
    return hosts


def ssl_context(mode: SslMode, files: TlsFiles) -> ssl.SSLContext:
    """A client context implementing libpq's meaning of ``mode`` (require/verify-ca/verify-full)."""
    if mode in VERIFYING_MODES:
        if files.root_cert is None:
            raise DatabaseTlsError(
                f"sslmode={mode} needs DATABASE_SSL_ROOT_CERT (the CA that signed the server's "
                "certificate)"
            )
        if not files.root_cert.is_file():
            raise DatabaseTlsError(f"DATABASE_SSL_ROOT_CERT: {files.root_cert} is not a file")
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.root_cert))
        context.check_hostname = mode == "verify-full"
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        # libpq's require: encrypted, the server's certificate not checked.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if files.cert is not None:
        context.load_cert_chain(str(files.cert), str(files.key) if files.key else None)
    return context


def asyncpg_ssl(url: str, files: TlsFiles) -> tuple[str, ssl.SSLContext | str | None]:
    """The URL without its ssl parameter, and what to pass as asyncpg's ``ssl`` argument."""
    mode = url_ssl_mode(url)
    stripped = without_ssl_parameters(url)
    if mode in ENCRYPTED_MODES:
        return stripped, ssl_context(mode, files)
    if mode is None:
        return stripped, None
    return stripped, mode


def libpq_parameters(url: str, files: TlsFiles) -> dict[str, str]:
    """sslmode and certificate files as libpq connection parameters (pg_dump, pg_restore)."""
    mode = url_ssl_mode(url)
    parameters: dict[str, str] = {}
    if mode is not None:
        parameters["sslmode"] = mode
    if files.root_cert is not None:
        parameters["sslrootcert"] = str(files.root_cert)
    if files.cert is not None:
        parameters["sslcert"] = str(files.cert)
    if files.key is not None:
        parameters["sslkey"] = str(files.key)
    return parameters


def tls_failure(exc: BaseException) -> str | None:
    """What went wrong, when ``exc`` (or its cause) is a failed TLS handshake or verification.

    Permanent until someone fixes a certificate or a setting, so not worth retrying, and the
    one line an operator needs: the certificate, host or mode that did not match.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {current.verify_message}"
        if isinstance(current, ssl.SSLError):
            return f"TLS handshake failed: {current.reason or current}"
        message = str(current)
        if type(current).__name__ == "ConnectionError" and "rejected SSL upgrade" in message:
            return "the server does not offer TLS, and the URL requires it"
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return None
