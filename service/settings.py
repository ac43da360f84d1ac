"""Settings: the only way configuration enters the service.

Sources, highest priority first: keyword arguments (tests), environment variables, an optional
``.env.<ENVIRONMENT>`` file (local use only), and a secrets directory (``SECRETS_DIR``: one file per
variable, as Kubernetes mounts a Secret). Nothing reads ``os.environ`` anywhere else.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service import __version__

if TYPE_CHECKING:
    from service.dbtls import TlsFiles

MIN_SECRET_LENGTH = 32
# RFC 9110 token characters: what a header name may consist of.
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    STAGING = "staging"
    PRODUCTION = "production"


class ConfigError(Exception):
    """Raised with one human-readable line naming the offending variable(s)."""


CommaList = Annotated[list[str], NoDecode]


def normalise_database_url(raw: str) -> str:
    """Accept the URLs hosting providers hand out and turn them into an asyncpg URL.

    Neon and Render give ``postgres://`` or ``postgresql://`` URLs with libpq options such as
    ``sslmode=require`` and ``channel_binding=require``. asyncpg takes ``ssl`` instead of
    ``sslmode`` and knows nothing of ``channel_binding`` (it negotiates SCRAM channel binding on
    its own), so both are translated here rather than failing at the first connection.
    """
    parts = urlsplit(raw.strip())
    scheme = parts.scheme.lower()
    if scheme in {"postgres", "postgresql", "postgresql+asyncpg"}:
        scheme = "postgresql+asyncpg"
    else:
        raise ValueError("must be a postgresql:// (or postgres://, postgresql+asyncpg://) URL")
    if (not parts.path or parts.path == "/") and "host=" not in parts.query:
        raise ValueError("must name a database, e.g. postgresql://user:pass@host:5432/app")
    query = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "sslmode":
            query.append(("ssl", value))
        elif key == "channel_binding":
            continue
        else:
            query.append((key, value))
    return urlunsplit((scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def mask_url(url: str) -> str:
    """The URL with its password replaced, for printing and logging."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


MAX_WORKERS = 64
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\[\]:-]+")
_DATABASE_URL_FIELDS = (
    "database_url",
    "database_read_url",
    "database_migration_url",
    "restore_drill_database_url",
)


def _default_workers() -> int:
    # gunicorn's classic 2*CPU+1 is for sync workers; async workers each saturate a core, so one per
    # core (at least 2, so a worker restart never leaves the pod without one) is the better default.
    # The CPUs this process may run on (taskset/cpuset), not the host's; capped like the setting,
    # so a big host with the variable unset still starts.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(MAX_WORKERS, max(2, cpus or 1))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        case_sensitive=False,
        extra="ignore",
        env_file_encoding="utf-8",
        validate_default=True,
    )

    # --- identity -----------------------------------------------------------------------------
    environment: Environment = Environment.DEVELOPMENT
    app_name: str = "fastapi-app"
    version: str = __version__
    debug: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"

    # --- server runtime -----------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    metrics_port: int = Field(9000, ge=0, le=65535)
    web_concurrency: int = Field(default_factory=_default_workers, ge=1, le=MAX_WORKERS)
    gunicorn_timeout: int = Field(30, ge=1)
    gunicorn_graceful_timeout: int = Field(20, ge=1)
    # Longer than the idle timeout of common load balancers (AWS ALB 60 s, nginx 60 s) so the
    # proxy, not the app, closes idle keep-alive connections: no race on a half-closed socket.
    gunicorn_keepalive: int = Field(75, ge=1)
    # A recycle costs a worker's boot (~1 s) and cuts its keep-alive connections: at the
    # ~1,000 requests/s a worker serves, 10,000 (gunicorn's usual advice) meant one every 10 s.
    gunicorn_max_requests: int = Field(100_000, ge=0)
    gunicorn_max_requests_jitter: int = Field(10_000, ge=0)
    forwarded_allow_ips: CommaList = Field(default_factory=lambda: ["127.0.0.1"])
    request_timeout_seconds: float = Field(
        15.0,
        ge=0,
        le=3600,
        description="Total time limit per request (0: none). Past it the handler is cancelled, "
        "its database connection dropped, and the request answered 503 problem+json with "
        "Retry-After (nothing applied), or 504 `commit-outcome-unknown` if its COMMIT was in "
        "flight. Keep it above the longest single database failure (pool checkout + statement "
        "+ 1 s backstop + rollback: 14 s by default) and at least 5 s below the proxy's read "
        "timeout (nginx PROXY_READ_TIMEOUT, 20 s), so the app, not the proxy, answers.",
    )
    prometheus_multiproc_dir: Path | None = None

    # --- database -----------------------------------------------------------------------------
    database_url: SecretStr | None = None
    database_read_url: SecretStr | None = None
    database_migration_url: SecretStr | None = None
    database_pool_mode: Literal["direct", "pgbouncer-transaction"] = "direct"
    # No overflow by default: under sustained load an overflow connection is closed as soon as
    # it is returned to a full pool and reopened by the next request (connection churn; the
    # bench measured 775 vs 1,213 requests/s for 10+10 vs 10+0). Size the pool instead.
    sqlalchemy_pool_size: int = Field(10, ge=1, le=200)
    sqlalchemy_pool_overflow: int = Field(0, ge=0, le=200)
    sqlalchemy_pool_timeout: float = Field(5.0, gt=0)
    sqlalchemy_pool_recycle: int = Field(1800, ge=-1)
    sqlalchemy_pool_pre_ping: bool = False
    sqlalchemy_echo: bool = False
    database_statement_timeout_ms: int = Field(5000, ge=0)
    database_connect_timeout: float = Field(3.0, gt=0, le=60)
    database_idle_in_transaction_timeout_ms: int = Field(
        10_000,
        ge=0,
        description="PostgreSQL ends a session idle inside a transaction for this long (its "
        "idle_in_transaction_session_timeout; 0 disables): the bound on locks and a pinned "
        "server connection when the client side vanished mid-transaction. Sent per connection "
        "in direct mode; behind PgBouncer (transaction pooling cannot carry it) set the same "
        "value on the app's role: ALTER ROLE app SET idle_in_transaction_session_timeout.",
    )
    database_tcp_keepalive_idle_seconds: int = Field(
        5,
        ge=0,
        le=3600,
        description="TCP keepalive on the app's database sockets (0: the OS default, hours): "
        "first probe after this much idleness. With the interval and count below, a silent peer "
        "(no FIN, no reset) is found within idle + interval x count seconds (11 s) of its last "
        "answer, also on a socket with unacknowledged data (TCP_USER_TIMEOUT is set to the "
        "same total).",
    )
    database_tcp_keepalive_interval_seconds: int = Field(
        2, ge=1, le=600, description="Seconds between TCP keepalive probes."
    )
    database_tcp_keepalive_count: int = Field(
        3, ge=1, le=30, description="Unanswered TCP keepalive probes before the socket is dropped."
    )
    database_connect_retry_attempts: int = Field(3, ge=1, le=10)
    database_read_max_lag_seconds: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="Reads go to the primary while the read replica's replay lag is above this.",
    )
    database_read_lag_poll_seconds: float = Field(
        1.0,
        ge=0.05,
        le=60,
        description="How often each worker measures the replica's replay lag (one query on the "
        "primary and one on the replica per poll).",
    )
    # TLS: the mode is the URL's sslmode; the files are shared by every URL (app, replica,
    # migration, backups). See service/dbtls.py.
    database_ssl_root_cert: Path | None = Field(
        None, description="CA file that signed the server certificate (verify-ca/verify-full)"
    )
    database_ssl_cert: Path | None = Field(None, description="client certificate, when required")
    database_ssl_key: Path | None = Field(None, description="client certificate's private key")
    database_plaintext_allowed_hosts: CommaList = Field(
        default_factory=list,
        description="hosts a production URL may reach without TLS (e.g. an in-cluster PgBouncer)",
    )

    # --- backups and the restore drill ----------------------------------------------------------
    backup_dir: Path | None = Field(None, description="directory (a PVC) holding backups")
    backup_keep_daily: int = Field(7, ge=1, le=366, description="newest backup of each of N days")
    backup_keep_weekly: int = Field(4, ge=0, le=520, description="newest of each of M ISO weeks")
    backup_timeout_seconds: int = Field(3600, ge=10, description="bound on pg_dump/pg_restore")
    pg_bin_dir: Path | None = Field(
        None, description="directory of pg_dump/pg_restore (default: PATH)"
    )
    restore_drill_database_url: SecretStr | None = Field(
        None,
        description="server (any database on it) where the drill creates its scratch database; "
        "default: DATABASE_MIGRATION_URL",
    )
    pushgateway_url: str | None = Field(None, description="Pushgateway for the jobs' metrics")
    backup_s3_bucket: str | None = Field(
        None, description="S3-compatible bucket the backups are uploaded to (BACKUP_DIR stages)"
    )
    backup_s3_prefix: str = Field("", description="key prefix inside the bucket")
    backup_s3_endpoint_url: str | None = Field(
        None, description="endpoint of a non-AWS S3 service (MinIO, R2, GCS interop, ...)"
    )
    backup_s3_region: str | None = Field(None, description="the bucket's region")
    backup_s3_access_key_id: SecretStr | None = Field(
        None, description="static credentials; unset: boto3's chain (workload identity)"
    )
    backup_s3_secret_access_key: SecretStr | None = Field(None, description="its secret")

    # --- HTTP ---------------------------------------------------------------------------------
    cors_origins: CommaList = Field(default_factory=list)
    allowed_hosts: CommaList = Field(default_factory=lambda: ["*"])
    max_request_body_bytes: int = Field(1_048_576, ge=1024)
    docs_enabled: bool | None = None

    # --- security -----------------------------------------------------------------------------
    api_key_cache_ttl_seconds: float = Field(30.0, ge=0, le=3600)
    gateway_shared_secret: SecretStr | None = None
    gateway_shared_secret_previous: SecretStr | None = None
    gateway_secret_header: str = "X-Gateway-Secret"  # noqa: S105 - a header name, not a secret
    gateway_required: bool = True
    # Gateway-trusted identity: the gateway (Zuplo's API keys) authenticates the caller and names
    # the consumer in a header. Trusted only on a request that also carries a valid gateway
    # secret; the secret is what makes the header the gateway's word rather than the client's.
    gateway_identity_enabled: bool = Field(
        False,
        description="Trust the consumer header the gateway sets as the caller's identity "
        "(only on requests carrying a valid gateway secret).",
    )
    gateway_consumer_header: str = Field(
        "X-Consumer-Id", description="Header naming the consumer the gateway authenticated."
    )
    gateway_consumer_scopes_header: str = Field(
        "X-Consumer-Scopes",
        description="Header with the consumer's scopes (space or comma separated).",
    )
    gateway_consumer_default_scopes: CommaList = Field(
        default_factory=lambda: ["tasks:read", "tasks:write"],
        description="Scopes of a gateway consumer whose request carries no scopes header.",
    )
    gateway_consumer_allowed_scopes: CommaList = Field(
        default_factory=lambda: ["tasks:read", "tasks:write"],
        description="The most the gateway can grant: scopes outside this list are dropped.",
    )
    jwt_secret_key: SecretStr | None = None
    jwt_jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_algorithms: CommaList = Field(default_factory=lambda: ["HS256", "RS256", "ES256"])
    jwt_leeway_seconds: int = Field(30, ge=0, le=600)
    jwks_cache_ttl_seconds: int = Field(600, ge=1)

    # --- rate limiting ------------------------------------------------------------------------
    rate_limit_enabled: bool = True
    rate_limit_default: str = "100/minute"
    rate_limit_per_ip: str = "300/minute"
    redis_url: SecretStr | None = None

    # --- error reporting ----------------------------------------------------------------------
    sentry_dsn: SecretStr | None = None
    sentry_traces_sample_rate: float = Field(0.0, ge=0, le=1)

    # --- domain -------------------------------------------------------------------------------
    idempotency_ttl_hours: int = Field(24, ge=24)

    @field_validator(
        "forwarded_allow_ips",
        "cors_origins",
        "allowed_hosts",
        "jwt_algorithms",
        "gateway_consumer_default_scopes",
        "gateway_consumer_allowed_scopes",
        "database_plaintext_allowed_hosts",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator(
        "database_url",
        "database_read_url",
        "database_migration_url",
        "restore_drill_database_url",
        mode="before",
    )
    @classmethod
    def _normalise_url(cls, value: Any) -> Any:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        from service.dbtls import url_ssl_mode

        url = normalise_database_url(str(value))
        url_ssl_mode(url)  # an unknown sslmode is refused here, not at the first connection
        return url

    @field_validator(
        "gateway_shared_secret",
        "gateway_shared_secret_previous",
        "jwt_secret_key",
        "redis_url",
        "sentry_dsn",
        "backup_s3_bucket",
        "backup_s3_endpoint_url",
        "backup_s3_region",
        "backup_s3_access_key_id",
        "backup_s3_secret_access_key",
        "pushgateway_url",
        "pg_bin_dir",
        "backup_dir",
        "database_ssl_root_cert",
        "database_ssl_cert",
        "database_ssl_key",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("rate_limit_default", "rate_limit_per_ip")
    @classmethod
    def _rate_limit_syntax(cls, value: str) -> str:
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError:
            raise ValueError("must look like '100/minute' or '10/second;300/minute'") from None
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            scheme = urlsplit(value.get_secret_value()).scheme.removeprefix("async+")
            if scheme not in {"redis", "rediss", "redis+unix"}:
                raise ValueError("must be a redis:// or rediss:// URL")
        return value

    @field_validator("jwt_algorithms")
    @classmethod
    def _known_jwt_algorithms(cls, value: list[str]) -> list[str]:
        from service.security.algorithms import SUPPORTED_ALGORITHMS

        unknown = [alg for alg in value if alg not in SUPPORTED_ALGORITHMS]
        if unknown or not value:
            raise ValueError(
                f"unsupported {', '.join(unknown) or '(empty)'}; use some of "
                + ", ".join(sorted(SUPPORTED_ALGORITHMS))
            )
        return value

    @model_validator(mode="after")
    def _jwt_consistency(self) -> Settings:
        from service.security.algorithms import effective_algorithms

        problems: list[str] = []
        if self.jwt_jwks_url:
            # Without both, any token the identity provider signs for any other API (or
            # tenant) would be accepted here.
            if not self.jwt_issuer or not self.jwt_audience:
                problems.append("JWT_JWKS_URL needs JWT_ISSUER and JWT_AUDIENCE")
            scheme = urlsplit(self.jwt_jwks_url).scheme
            if scheme not in {"http", "https"}:
                problems.append("JWT_JWKS_URL must be an https:// URL")
            elif scheme != "https" and self.environment is Environment.PRODUCTION:
                problems.append("JWT_JWKS_URL must be https in production")
        for source, present in (
            ("JWT_SECRET_KEY", self.jwt_secret_key is not None),
            ("JWT_JWKS_URL", bool(self.jwt_jwks_url)),
        ):
            usable = effective_algorithms(
                self.jwt_algorithms,
                has_secret=source == "JWT_SECRET_KEY",
                has_jwks=source == "JWT_JWKS_URL",
            )
            if present and not usable:
                problems.append(f"JWT_ALGORITHMS allows no algorithm usable with {source}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @field_validator("gateway_consumer_default_scopes", "gateway_consumer_allowed_scopes")
    @classmethod
    def _known_scopes(cls, value: list[str]) -> list[str]:
        from service.security.principal import Scope

        known = {scope.value for scope in Scope}
        unknown = [scope for scope in value if scope not in known]
        if unknown:
            raise ValueError(
                f"unknown scope {', '.join(unknown)}; use some of {', '.join(sorted(known))}"
            )
        return sorted(set(value))

    @field_validator("gateway_secret_header", "gateway_consumer_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not HEADER_NAME.fullmatch(value.strip()):
            raise ValueError("must be an HTTP header name, e.g. X-Consumer-Id")
        return value.strip()

    @field_validator("gateway_consumer_scopes_header")
    @classmethod
    def _optional_header_name(cls, value: str) -> str:
        # Empty: the gateway sends no scopes and every consumer gets the default scopes.
        if value.strip() and not HEADER_NAME.fullmatch(value.strip()):
            raise ValueError("must be an HTTP header name, or empty")
        return value.strip()

    @model_validator(mode="after")
    def _gateway_identity_consistency(self) -> Settings:
        if not self.gateway_identity_enabled:
            return self
        problems: list[str] = []
        if self.gateway_shared_secret is None:
            # Without a secret nothing proves the header came from the gateway.
            problems.append("GATEWAY_IDENTITY_ENABLED needs GATEWAY_SHARED_SECRET")
        if self.environment is Environment.PRODUCTION and not self.gateway_required:
            problems.append(
                "GATEWAY_IDENTITY_ENABLED is refused in production unless GATEWAY_REQUIRED=true"
            )
        headers = [
            self.gateway_secret_header.lower(),
            self.gateway_consumer_header.lower(),
            self.gateway_consumer_scopes_header.lower(),
        ]
        if len(set(filter(None, headers))) != len(list(filter(None, headers))):
            problems.append(
                "GATEWAY_SECRET_HEADER, GATEWAY_CONSUMER_HEADER and "
                "GATEWAY_CONSUMER_SCOPES_HEADER must differ"
            )
        extra = set(self.gateway_consumer_default_scopes) - set(
            self.gateway_consumer_allowed_scopes
        )
        if extra:
            problems.append(
                "GATEWAY_CONSUMER_DEFAULT_SCOPES must be within GATEWAY_CONSUMER_ALLOWED_SCOPES "
                f"({', '.join(sorted(extra))} is not)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @field_validator("cors_origins")
    @classmethod
    def _no_wildcard_origin(cls, value: list[str]) -> list[str]:
        # CORS is configured with credentials allowed; browsers reject "*" with credentials and a
        # reflected wildcard would hand any site the user's credentials.
        if "*" in value:
            raise ValueError("'*' is not allowed: list the origins explicitly")
        # Sandboxed iframes, data: and file: pages all send "Origin: null", so with credentials
        # allowed it admits any site that wraps itself in one: as bad as "*".
        if any(origin.lower() == "null" for origin in value):
            raise ValueError("'null' is not allowed: any sandboxed page sends Origin: null")
        malformed = [origin for origin in value if not _ORIGIN.fullmatch(origin)]
        if malformed:
            # A browser's Origin never has a path or a trailing slash, so such an entry would
            # silently match nothing.
            raise ValueError(
                f"{', '.join(malformed)}: an origin is scheme://host[:port], nothing after it"
            )
        return value

    @model_validator(mode="after")
    def _files_and_credential_pairs(self) -> Settings:
        from service.dbtls import VERIFYING_MODES, url_ssl_mode

        problems = []
        for name in ("database_ssl_root_cert", "database_ssl_cert", "database_ssl_key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                problems.append(f"{name.upper()}: {path} is not a file")
        if (self.database_ssl_cert is None) != (self.database_ssl_key is None):
            problems.append("DATABASE_SSL_CERT and DATABASE_SSL_KEY go together")
        if (self.backup_s3_access_key_id is None) != (self.backup_s3_secret_access_key is None):
            problems.append("BACKUP_S3_ACCESS_KEY_ID and BACKUP_S3_SECRET_ACCESS_KEY go together")
        if self.database_ssl_root_cert is None:
            for name in _DATABASE_URL_FIELDS:
                secret = getattr(self, name)
                mode = url_ssl_mode(secret.get_secret_value()) if secret is not None else None
                if mode in VERIFYING_MODES:
                    problems.append(
                        f"{name.upper()}: sslmode={mode} needs DATABASE_SSL_ROOT_CERT (the CA "
                        "that signed the server's certificate)"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _production_guards(self) -> Settings:
        if self.environment is not Environment.PRODUCTION:
            return self
        problems: list[str] = []
        if self.debug:
            problems.append("DEBUG must be false in production")
        if self.database_url is None:
            problems.append("DATABASE_URL is required in production")
        if self.sqlalchemy_echo:
            # SQLAlchemy prints statements and their bound values (key hashes, task contents)
            # straight to its logger, outside the JSON format's redaction.
            problems.append("SQLALCHEMY_ECHO must be false in production")
        if self.gateway_required and self.gateway_shared_secret is None:
            problems.append(
                "GATEWAY_SHARED_SECRET is required in production (set GATEWAY_REQUIRED=false "
                "to serve without a gateway)"
            )
        for name in ("gateway_shared_secret", "gateway_shared_secret_previous", "jwt_secret_key"):
            secret = getattr(self, name)
            if secret is not None and len(secret.get_secret_value()) < MIN_SECRET_LENGTH:
                problems.append(f"{name.upper()} must be at least {MIN_SECRET_LENGTH} characters")
        problems.extend(self._plaintext_database_urls())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _plaintext_database_urls(self) -> list[str]:
        """Production URLs that would carry credentials and rows unencrypted across a network."""
        from service.dbtls import ENCRYPTED_MODES, is_local_host, url_hosts, url_ssl_mode

        allowed = {host.lower() for host in self.database_plaintext_allowed_hosts}
        problems = []
        for name in _DATABASE_URL_FIELDS:
            secret = getattr(self, name)
            if secret is None:
                continue
            url = secret.get_secret_value()
            if url_ssl_mode(url) in ENCRYPTED_MODES:
                continue
            remote = [
                h for h in url_hosts(url) if not is_local_host(h) and h.lower() not in allowed
            ]
            if remote:
                problems.append(
                    f"{name.upper()} reaches {', '.join(remote)} without TLS: add "
                    "sslmode=verify-full (or require/verify-ca) to the URL, or list the host in "
                    "DATABASE_PLAINTEXT_ALLOWED_HOSTS"
                )
        return problems

    # --- derived ------------------------------------------------------------------------------
    @property
    def is_production_like(self) -> bool:
        return self.environment in {Environment.STAGING, Environment.PRODUCTION}

    @property
    def show_docs(self) -> bool:
        if self.docs_enabled is not None:
            return self.docs_enabled
        return self.environment is not Environment.PRODUCTION

    @property
    def resolved_log_format(self) -> Literal["json", "console"]:
        if self.log_format != "auto":
            return self.log_format
        return "json" if self.environment is not Environment.DEVELOPMENT else "console"

    def database_dead_peer_seconds(self) -> int:
        """How long a silent database peer can go unnoticed on an open socket (0: OS default)."""
        if not self.database_tcp_keepalive_idle_seconds:
            return 0
        return (
            self.database_tcp_keepalive_idle_seconds
            + self.database_tcp_keepalive_interval_seconds * self.database_tcp_keepalive_count
        )

    def require_database_url(self) -> str:
        if self.database_url is None:
            raise ConfigError("DATABASE_URL: not set (make run starts an embedded PostgreSQL)")
        return self.database_url.get_secret_value()

    def migration_url(self) -> str:
        if self.database_migration_url is not None:
            return self.database_migration_url.get_secret_value()
        return self.require_database_url()

    def tls_files(self) -> TlsFiles:
        from service.dbtls import TlsFiles

        return TlsFiles(self.database_ssl_root_cert, self.database_ssl_cert, self.database_ssl_key)

    def drill_admin_url(self) -> str:
        if self.restore_drill_database_url is not None:
            return self.restore_drill_database_url.get_secret_value()
        return self.migration_url()

    def secret_values(self) -> list[str]:
        """Every secret this configuration holds, for log redaction."""
        values: list[str] = []
        for name, field in type(self).model_fields.items():
            if field.annotation is not None and "SecretStr" in str(field.annotation):
                secret = getattr(self, name)
                if secret is not None:
                    values.append(secret.get_secret_value())
        for url_field in (
            self.database_url,
            self.database_read_url,
            self.database_migration_url,
            self.restore_drill_database_url,
        ):
            if url_field is not None:
                password = urlsplit(url_field.get_secret_value()).password
                if password:
                    values.append(password)
        return [value for value in values if len(value) >= 4]

    def masked(self) -> dict[str, Any]:
        """The effective configuration with every secret masked (``check-config``)."""
        shown: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                raw = value.get_secret_value()
                value = mask_url(raw) if "://" in raw and "url" in name else "***"
            elif isinstance(value, StrEnum):
                value = value.value
            elif isinstance(value, Path):
                value = str(value)
            shown[name.upper()] = value
        return shown


def format_validation_error(error: ValidationError) -> str:
    """One line naming each offending variable: what an operator reads in a crash-looping pod."""
    parts = []
    for item in error.errors():
        name = ".".join(str(loc) for loc in item["loc"]).upper()
        message = str(item["msg"]).removeprefix("Value error, ")
        parts.append(f"{name}: {message}" if name else message)
    return "invalid configuration: " + "; ".join(parts)


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from the environment (plus overrides), raising ConfigError on a bad value."""
    environment = str(
        overrides.get("environment") or os.environ.get("ENVIRONMENT") or "development"
    )
    env_file = Path(f".env.{environment}")
    secrets_dir = overrides.pop("secrets_dir", None) or os.environ.get("SECRETS_DIR")
    if secrets_dir and not Path(secrets_dir).is_dir():
        raise ConfigError(f"invalid configuration: SECRETS_DIR: {secrets_dir} is not a directory")
    try:
        return Settings(
            _env_file=env_file if env_file.is_file() else None,
            _secrets_dir=secrets_dir,
            **overrides,
        )
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None
