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
from pydantic.config import JsonDict
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service import __version__
from service.security.principal import Scope

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


EXIT_CONFIG = 2
"""The exit code of a process stopped by a ``ConfigError`` (a configuration error, not a crash)."""


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


def contract(
    *,
    chart: str | None = None,
    values_block: Literal["config", "secrets"] | None = None,
    default: str | None = None,
    values: JsonDict | None = None,
) -> JsonDict:
    """Deployment metadata of a field, read by ``service.configcontract``.

    ``chart``: how the Helm chart sets the variable when it is not a key of the chart's
    ``config``/``secrets`` values (the variable is then left out of those blocks, unless
    ``values_block`` names the one it stays in). ``default``:
    the documented default where the field's own is computed or not telling. ``values``: extra
    JSON schema for the chart's ``config``/``secrets`` entry (patterns the type cannot express).
    A field without any of it is a plain ``config`` (or, if secret, ``secrets``) key.
    """
    extra: JsonDict = {}
    if chart is not None:
        extra["chart"] = chart
    if values_block is not None:
        extra["values_block"] = values_block
    if default is not None:
        extra["documented_default"] = default
    if values is not None:
        extra["values_schema"] = values
    return extra


_DATABASE_URL_PATTERN = "^((postgres|postgresql|postgresql\\+asyncpg)://.+)?$"
_RATE_LIMIT_PATTERN = "^[0-9]+ ?(/|per ) ?[0-9]* ?(second|minute|hour|day)s?$"
# Empty, or long enough for production (MIN_SECRET_LENGTH): caught at `helm install`.
_TOKEN_SECRET_SCHEMA: JsonDict = {"anyOf": [{"maxLength": 0}, {"minLength": MIN_SECRET_LENGTH}]}
_SCOPES_SCHEMA: JsonDict = {
    "pattern": "^\\s*((" + "|".join(s.value for s in Scope) + ")\\s*(,\\s*|$))*$"
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        case_sensitive=False,
        extra="ignore",
        env_file_encoding="utf-8",
        validate_default=True,
    )

    # --- identity -----------------------------------------------------------------------------
    environment: Environment = Field(
        Environment.DEVELOPMENT,
        description="Selects the log format, docs, HSTS and the production guards.",
    )
    app_name: str = Field(
        "fastapi-app",
        description="Used in `application_name` on database connections and in logs.",
        json_schema_extra=contract(chart="the backup jobs: the release's full name"),
    )
    version: str = Field(
        __version__,
        description="Reported by `/health`, `app_info` and Sentry's `release`.",
        json_schema_extra=contract(
            chart="not set: the image's package version", default="package version"
        ),
    )
    debug: bool = Field(False, description="Debug mode; refused in production.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Level of the service's own loggers."
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="`auto`: a readable console format in development, JSON elsewhere."
    )

    # --- server runtime -----------------------------------------------------------------------
    host: str = Field(
        "127.0.0.1",
        description="Bind address (`0.0.0.0` in the image).",
        json_schema_extra=contract(chart="always `0.0.0.0`"),
    )
    port: int = Field(
        8000,
        ge=1,
        le=65535,
        description="API port.",
        json_schema_extra=contract(chart="always `8000` (the Service maps `service.port` to it)"),
    )
    metrics_port: int = Field(
        9000,
        ge=0,
        le=65535,
        description="Prometheus `/metrics` port, never the API port; `0` disables.",
        json_schema_extra=contract(chart="always `9000` (`service.metricsPort` maps to it)"),
    )
    web_concurrency: int = Field(
        default_factory=_default_workers,
        ge=1,
        le=MAX_WORKERS,
        description="gunicorn worker processes.",
        json_schema_extra=contract(default=f"usable CPUs (2-{MAX_WORKERS})"),
    )
    gunicorn_timeout: int = Field(
        30, ge=1, description="Seconds before a silent worker is killed and replaced."
    )
    gunicorn_graceful_timeout: int = Field(
        20, ge=1, description="Seconds in-flight requests get after SIGTERM."
    )
    # Longer than the idle timeout of common load balancers (AWS ALB 60 s, nginx 60 s) so the
    # proxy, not the app, closes idle keep-alive connections: no race on a half-closed socket.
    gunicorn_keepalive: int = Field(
        75,
        ge=1,
        description="Keep-alive seconds; longer than the load balancer's idle timeout (60 s).",
    )
    # A recycle costs a worker's boot (~1 s) and cuts its keep-alive connections: at the
    # ~1,000 requests/s a worker serves, 10,000 (gunicorn's usual advice) meant one every 10 s.
    gunicorn_max_requests: int = Field(
        100_000,
        ge=0,
        description="Recycle a worker after this many requests (0: never); a recycle costs a "
        "worker boot and its keep-alive connections.",
    )
    gunicorn_max_requests_jitter: int = Field(
        10_000, ge=0, description="Random spread so workers do not recycle together."
    )
    forwarded_allow_ips: CommaList = Field(
        default_factory=lambda: ["127.0.0.1"],
        description="Proxies whose `X-Forwarded-For`/`-Proto` are trusted (addresses and CIDRs); "
        "never `*` behind a proxy (docs/security.md#proxy-trust-forwarded_allow_ips).",
    )
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
    prometheus_multiproc_dir: Path | None = Field(
        None,
        description="Multiprocess metrics directory, wiped at start (image: "
        "`/tmp/prometheus-multiproc`).",
        json_schema_extra=contract(chart="always `/tmp/prometheus-multiproc` (an emptyDir)"),
    )

    # --- database -----------------------------------------------------------------------------
    database_url: SecretStr | None = Field(
        None,
        description="`postgresql+asyncpg://…`; `postgres://`/`postgresql://` accepted, `sslmode` "
        "translated. Required in production.",
        json_schema_extra=contract(values={"pattern": _DATABASE_URL_PATTERN}),
    )
    database_read_url: SecretStr | None = Field(
        None,
        description="Optional streaming read replica for reads (docs/read-replica.md).",
        json_schema_extra=contract(values={"pattern": _DATABASE_URL_PATTERN}),
    )
    database_migration_url: SecretStr | None = Field(
        None,
        description="Direct (non-PgBouncer) URL used by `migrate`, `backup` and `restore-drill`: "
        "the schema owner's role; when its user differs from `DATABASE_URL`'s, `migrate` grants "
        "the app role row access only (docs/backup-restore.md#least-privilege-roles).",
        json_schema_extra=contract(
            chart="`secrets.DATABASE_MIGRATION_URL` (the owner Secret: the migration and backup "
            "jobs only)",
            values_block="secrets",
            default="`DATABASE_URL`",
            values={"pattern": _DATABASE_URL_PATTERN},
        ),
    )
    database_pool_mode: Literal["direct", "pgbouncer-prepared", "pgbouncer-transaction"] = Field(
        "direct",
        description="Behind PgBouncer in transaction pooling: `pgbouncer-prepared` when it tracks "
        "prepared statements (>= 1.21 with `max_prepared_statements` > 0; statement caches stay "
        "on), else `pgbouncer-transaction` (caches off, statements named uniquely, reads in "
        "`BEGIN READ ONLY`). The chart picks one when `pgbouncer.enabled`.",
    )
    # No overflow by default: under sustained load an overflow connection is closed as soon as
    # it is returned to a full pool and reopened by the next request (connection churn; the
    # bench measured 775 vs 1,213 requests/s for 10+10 vs 10+0). Size the pool instead.
    sqlalchemy_pool_size: int = Field(
        10,
        ge=1,
        le=200,
        description="Connections kept per worker: the DB-using requests one worker serves at once "
        "(more wait up to `SQLALCHEMY_POOL_TIMEOUT`).",
    )
    sqlalchemy_pool_overflow: int = Field(
        0,
        ge=0,
        le=200,
        description="Extra connections per worker, closed again when returned to a full pool: "
        "under sustained load that is connection churn, so size the pool instead.",
    )
    sqlalchemy_pool_timeout: float = Field(
        5.0, gt=0, description="Seconds to wait for a pooled connection."
    )
    sqlalchemy_pool_recycle: int = Field(
        1800, ge=-1, description="Seconds after which a connection is replaced (-1: never)."
    )
    sqlalchemy_pool_pre_ping: bool = Field(
        False,
        description="Also ping a connection with a round trip before use. A connection the server "
        "closed is always detected at checkout at no cost; turn this on only where a network "
        "drops idle connections silently.",
    )
    sqlalchemy_echo: bool = Field(
        False,
        description="Log SQL with its bound values (development only; refused in production: it "
        "bypasses the JSON format and its redaction).",
    )
    database_statement_timeout_ms: int = Field(
        5000,
        ge=0,
        description="Server-side `statement_timeout` (direct mode) and client-side cancel; "
        "`0` disables.",
    )
    database_connect_timeout: float = Field(
        3.0,
        gt=0,
        le=60,
        description="Seconds for obtaining a connection, retries included; then 503.",
    )
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
    database_connect_retry_attempts: int = Field(
        3,
        ge=1,
        le=10,
        description="Connection attempts within that time (stamina, jittered backoff).",
    )
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
        None,
        description="CA file for `sslmode=verify-ca`/`verify-full` (required by them), for every "
        "database URL and the backup tools.",
        json_schema_extra=contract(chart="`databaseTLS` (the mounted Secret's `ca.crt`)"),
    )
    database_ssl_cert: Path | None = Field(
        None,
        description="Client certificate, where the server requires one (with DATABASE_SSL_KEY).",
        json_schema_extra=contract(chart="`databaseTLS.clientCertificate` (`tls.crt`)"),
    )
    database_ssl_key: Path | None = Field(
        None,
        description="The client certificate's private key.",
        json_schema_extra=contract(chart="`databaseTLS.clientCertificate` (`tls.key`)"),
    )
    database_plaintext_allowed_hosts: CommaList = Field(
        default_factory=list,
        description="Hosts a production database URL may reach without TLS, e.g. an in-cluster "
        "PgBouncer (the chart adds its own when `pgbouncer.enabled`).",
    )

    # --- backups and the restore drill ----------------------------------------------------------
    backup_dir: Path | None = Field(
        None,
        description="Directory (a PVC) for `backup` and `restore-drill`.",
        json_schema_extra=contract(chart="`backup.persistence` (the volume's mount path)"),
    )
    backup_keep_daily: int = Field(
        7,
        ge=1,
        le=366,
        description="Keep the newest backup of each of this many days.",
        json_schema_extra=contract(chart="`backup.keepDaily`"),
    )
    backup_keep_weekly: int = Field(
        4,
        ge=0,
        le=520,
        description="And of each of this many ISO weeks.",
        json_schema_extra=contract(chart="`backup.keepWeekly`"),
    )
    backup_timeout_seconds: int = Field(
        3600,
        ge=10,
        description="Bound on each `pg_dump`/`pg_restore` run.",
        json_schema_extra=contract(chart="`backup.activeDeadlineSeconds`"),
    )
    pg_bin_dir: Path | None = Field(
        None,
        description="Directory of `pg_dump`/`pg_restore`, of the server's major version. The "
        "image carries PostgreSQL 16's in /usr/lib/postgresql/16/bin, on `PATH`.",
        json_schema_extra=contract(chart="`backup.pgBinDir`", default="unset (`PATH`)"),
    )
    restore_drill_database_url: SecretStr | None = Field(
        None,
        description="Server on which the restore drill creates (and drops) its scratch database; "
        "the role needs `CREATEDB`.",
        json_schema_extra=contract(
            chart="`secrets.RESTORE_DRILL_DATABASE_URL` (the owner Secret: backup jobs only)",
            values_block="secrets",
            default="`DATABASE_MIGRATION_URL`",
            values={"pattern": _DATABASE_URL_PATTERN},
        ),
    )
    pushgateway_url: str | None = Field(
        None,
        description="Pushgateway for the `backup_*`/`restore_drill_*` metrics (pushed on success "
        "only).",
        json_schema_extra=contract(chart="`backup.metrics.pushgatewayUrl`"),
    )
    backup_s3_bucket: str | None = Field(
        None,
        description="S3-compatible bucket each backup is uploaded to (retention runs there; the "
        "drill restores from it); `BACKUP_DIR` then only stages.",
        json_schema_extra=contract(chart="`backup.s3.bucket`"),
    )
    backup_s3_prefix: str = Field(
        "",
        description="Key prefix inside the bucket.",
        json_schema_extra=contract(chart="`backup.s3.prefix`"),
    )
    backup_s3_endpoint_url: str | None = Field(
        None,
        description="Endpoint of a non-AWS S3 service (MinIO, R2, GCS interoperability).",
        json_schema_extra=contract(chart="`backup.s3.endpointUrl`", default="unset (AWS)"),
    )
    backup_s3_region: str | None = Field(
        None,
        description="The bucket's region.",
        json_schema_extra=contract(chart="`backup.s3.region`"),
    )
    backup_s3_access_key_id: SecretStr | None = Field(
        None,
        description="Static credentials (with BACKUP_S3_SECRET_ACCESS_KEY); unset: boto3's chain, "
        "i.e. workload identity.",
        json_schema_extra=contract(chart="`backup.s3.existingSecret`"),
    )
    backup_s3_secret_access_key: SecretStr | None = Field(
        None,
        description="Their secret.",
        json_schema_extra=contract(chart="`backup.s3.existingSecret`"),
    )

    # --- HTTP ---------------------------------------------------------------------------------
    cors_origins: CommaList = Field(
        default_factory=list,
        description="Allowed browser origins (`scheme://host[:port]`); `*` and `null` are refused.",
        json_schema_extra=contract(values={"not": {"pattern": "(^|,)\\s*\\*\\s*(,|$)"}}),
    )
    allowed_hosts: CommaList = Field(
        default_factory=lambda: ["*"], description="Accepted `Host` headers."
    )
    max_request_body_bytes: int = Field(
        1_048_576, ge=1024, description="Larger bodies get 413, enforced while streaming."
    )
    docs_enabled: bool | None = Field(
        None,
        description="Serve `/docs` and `/redoc` (`/openapi.json` is always served).",
        json_schema_extra=contract(default="on, off in production"),
    )

    # --- security -----------------------------------------------------------------------------
    api_key_cache_ttl_seconds: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="How long a verified key is trusted without the database; bounds the "
        "revocation delay.",
    )
    gateway_shared_secret: SecretStr | None = Field(
        None,
        description="Secret every non-probe request must carry; required in production unless "
        "GATEWAY_REQUIRED=false.",
        json_schema_extra=contract(values=_TOKEN_SECRET_SCHEMA),
    )
    gateway_shared_secret_previous: SecretStr | None = Field(
        None,
        description="The old secret, still accepted during a rotation.",
        json_schema_extra=contract(values=_TOKEN_SECRET_SCHEMA),
    )
    gateway_secret_header: str = Field(
        "X-Gateway-Secret",
        description="Header carrying it (`x-zuplo-secret` for Zuplo).",
    )
    gateway_required: bool = Field(
        True, description="Set `false` to run production without a gateway."
    )
    # Gateway-trusted identity: the gateway (Zuplo's API keys) authenticates the caller and names
    # the consumer in a header. Trusted only on a request that also carries a valid gateway
    # secret; the secret is what makes the header the gateway's word rather than the client's.
    gateway_identity_enabled: bool = Field(
        False,
        description="Trust the consumer the gateway names in GATEWAY_CONSUMER_HEADER as the "
        "caller, only on requests with a valid gateway secret; needs GATEWAY_SHARED_SECRET, "
        "refused in production with GATEWAY_REQUIRED=false.",
    )
    gateway_consumer_header: str = Field(
        "X-Consumer-Id",
        description="Header the gateway sets to the authenticated consumer (its subject becomes "
        "the owner: a UUID as given, a name mapped to a stable UUID).",
        json_schema_extra=contract(values={"pattern": f"^{HEADER_NAME.pattern}$"}),
    )
    gateway_consumer_scopes_header: str = Field(
        "X-Consumer-Scopes",
        description="Header with the consumer's scopes (space or comma separated); empty: "
        "always the default scopes.",
        json_schema_extra=contract(
            values={"pattern": f"^{HEADER_NAME.pattern.removesuffix('+')}*$"}
        ),
    )
    gateway_consumer_default_scopes: CommaList = Field(
        default_factory=lambda: ["tasks:read", "tasks:write"],
        description="Scopes of a gateway consumer whose request carries no scopes header.",
        json_schema_extra=contract(values=_SCOPES_SCHEMA),
    )
    gateway_consumer_allowed_scopes: CommaList = Field(
        default_factory=lambda: ["tasks:read", "tasks:write"],
        description="The most the gateway can grant: scopes outside this list are dropped.",
        json_schema_extra=contract(values=_SCOPES_SCHEMA),
    )
    jwt_secret_key: SecretStr | None = Field(
        None,
        description="HS256 key for JWT bearer tokens.",
        json_schema_extra=contract(values=_TOKEN_SECRET_SCHEMA),
    )
    jwt_jwks_url: str | None = Field(
        None,
        description="JWKS URL for RS256/ES256 tokens (cached, refreshed on an unknown `kid`).",
    )
    jwt_issuer: str | None = Field(None, description="Required `iss`.")
    jwt_audience: str | None = Field(None, description="Required `aud`.")
    jwt_algorithms: CommaList = Field(
        default_factory=lambda: ["HS256", "RS256", "ES256"], description="Allowed algorithms."
    )
    jwt_leeway_seconds: int = Field(
        30, ge=0, le=600, description="Clock skew allowed on `exp`/`nbf`."
    )
    jwks_cache_ttl_seconds: int = Field(600, ge=1, description="JWKS cache lifetime.")

    # --- rate limiting ------------------------------------------------------------------------
    rate_limit_enabled: bool = Field(True, description="Switch rate limiting off entirely.")
    rate_limit_default: str = Field(
        "100/minute",
        description="Budget per principal.",
        json_schema_extra=contract(values={"pattern": _RATE_LIMIT_PATTERN}),
    )
    rate_limit_per_ip: str = Field(
        "300/minute",
        description="Budget per client IP.",
        json_schema_extra=contract(values={"pattern": _RATE_LIMIT_PATTERN}),
    )
    redis_url: SecretStr | None = Field(
        None,
        description="Shared rate-limit storage; in-memory (per process) when unset.",
        json_schema_extra=contract(values={"pattern": "^(rediss?://.+)?$"}),
    )

    # --- error reporting ----------------------------------------------------------------------
    sentry_dsn: SecretStr | None = Field(None, description="Enables Sentry error reporting.")
    sentry_traces_sample_rate: float = Field(
        0.0, ge=0, le=1, description="Sentry performance sampling."
    )

    # --- domain -------------------------------------------------------------------------------
    idempotency_ttl_hours: int = Field(
        24, ge=24, description="How long `Idempotency-Key` records are kept."
    )

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

    @property
    def behind_pgbouncer(self) -> bool:
        """DATABASE_URL goes through PgBouncer's transaction pooling (either pgbouncer mode)."""
        return self.database_pool_mode != "direct"

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
