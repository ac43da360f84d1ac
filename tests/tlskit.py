"""Certificates made in the test: a CA, server certificates it signs, client certificates."""

from __future__ import annotations

import datetime as dt
import glob
import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Issued:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return Issued(cert_path, key_path)


@dataclass(frozen=True)
class CertificateAuthority:
    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    path: Path

    @classmethod
    def create(cls, directory: Path, name: str) -> CertificateAuthority:
        key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        issued = _write(directory, name, cert, key)
        return cls(name, cert, key, issued.cert)

    def issue(
        self, directory: Path, stem: str, *, common_name: str, dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (), client: bool = False,
    ) -> Issued:  # fmt: skip
        key = _key()
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return _write(directory, stem, builder.sign(self.key, hashes.SHA256()), key)


# --- a PostgreSQL server with TLS ---------------------------------------------------------------
def _built_with_openssl(bin_dir: Path) -> bool:
    pg_config = bin_dir / "pg_config"
    if not ((bin_dir / "postgres").is_file() and pg_config.is_file()):
        return False
    configure = subprocess.run(
        [str(pg_config), "--configure"], capture_output=True, text=True, check=False
    ).stdout
    return "--with-openssl" in configure or "--with-ssl=openssl" in configure


def postgres_with_openssl() -> Path:
    """The bin directory of a PostgreSQL server built with OpenSSL (the pgserver wheel's is
    not); skips locally, fails in CI, when there is none."""
    from testkit import skip_or_fail

    candidates = (Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))
    found = next((candidate for candidate in candidates if _built_with_openssl(candidate)), None)
    if found is None:
        skip_or_fail(
            "no PostgreSQL server built with OpenSSL (.ci/run installs Debian's postgresql)"
        )
    return found


def install_server_tls(
    pgdata: Path, psql: Any, certificate: Issued, *, client_ca: Path | None = None
) -> None:
    """Give a running server in ``pgdata`` its certificate (and a CA for client certificates),
    turn ``ssl`` on and reload; ``psql`` runs SQL as its superuser."""
    owner = pgdata.stat()
    files = [(certificate.cert, "server.crt"), (certificate.key, "server.key")]
    settings = ["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"]
    if client_ca is not None:
        files.append((client_ca, "root.crt"))
        settings.append("ssl_ca_file = 'root.crt'")
    for source, name in files:
        target = pgdata / name
        shutil.copyfile(source, target)
        os.chown(target, owner.st_uid, owner.st_gid)
        target.chmod(0o600)
    for setting in settings:
        psql(f"ALTER SYSTEM SET {setting}")
    psql("SELECT pg_reload_conf()")
