"""``python -m service <command>``: the operator's entry points.

Each command loads Settings itself, so a bad variable stops it with one clear line (exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from service.settings import EXIT_CONFIG, ConfigError, Settings, load_settings


def _settings() -> Settings:
    """The settings, with logging configured from them: every command logs as the server does
    (JSON outside development), so a migration Job's lines parse like the pods'."""
    from service.observability.logging import configure_logging

    settings = load_settings()
    configure_logging(settings)
    return settings


def _positive_days(raw: str) -> int:
    try:
        days = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number of days") from None
    if days < 1:
        # 0 used to mean "never expires" and a negative number "already expired": leave the
        # option out for a key that does not expire.
        raise argparse.ArgumentTypeError(
            f"must be at least 1, not {days}; omit it for a key that never expires"
        )
    return days


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings()
    print(json.dumps(settings.masked(), indent=2, sort_keys=True, default=str))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from service.dbtls import tls_failure
    from service.migrate import downgrade, upgrade

    # _settings() configured logging: the migration Job's output goes to the same pipeline as
    # the server's, JSON lines outside development, redacted.
    settings = _settings()
    url = settings.migration_url()
    # The outcome is logged (migrate_done / migrate_downgraded); the line for people is printed
    # only where the logs are for people too.
    for_people = settings.resolved_log_format == "console"
    try:
        if args.downgrade:
            asyncio.run(downgrade(url, args.downgrade, tls=settings.tls_files()))
            if for_people:
                print(f"downgraded to {args.downgrade}")
            return 0
        before, after = asyncio.run(upgrade(url, args.revision, tls=settings.tls_files()))
    except Exception as exc:
        reason = tls_failure(exc)
        if reason is None:
            raise
        print(f"error: TLS to the database failed: {reason}", file=sys.stderr)
        return 1
    if for_people:
        print(f"schema: {','.join(sorted(before)) or 'empty'} -> {','.join(sorted(after))}")
    app_role = _separate_app_role(settings)
    if app_role is not None:
        from service.db_roles import RoleError

        try:
            _apply_grants(settings, app_role)
        except RoleError as exc:
            # The schema is migrated; the grants are the next step, not a reason to fail it.
            print(f"warning: grants skipped: {exc}", file=sys.stderr)
    return 0


def _separate_app_role(settings: Settings) -> str | None:
    """The app's role when it differs from the migration role (the least-privilege setup)."""
    from service.db_roles import url_user

    if settings.database_url is None or settings.database_migration_url is None:
        return None
    app = url_user(settings.database_url.get_secret_value())
    owner = url_user(settings.database_migration_url.get_secret_value())
    return app if app and owner and app != owner else None


def _apply_grants(settings: Settings, app_role: str) -> None:
    from service.db_roles import grant_app_role

    asyncio.run(grant_app_role(settings.migration_url(), app_role, settings.tls_files()))
    print(f"grants: {app_role} may read and write rows (no DDL, no TRUNCATE)")


def cmd_grant_app_role(args: argparse.Namespace) -> int:
    from service.db_roles import RoleError, url_user

    settings = _settings()
    role = args.role or (
        url_user(settings.database_url.get_secret_value()) if settings.database_url else None
    )
    if not role:
        print("error: --role, or a DATABASE_URL naming the app's user", file=sys.stderr)
        return EXIT_CONFIG
    try:
        _apply_grants(settings, role)
    except RoleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def _backup_store(settings: Settings) -> Any:
    from service.backup.store import DirectoryStore

    if settings.backup_dir is None:
        raise ConfigError("invalid configuration: BACKUP_DIR: not set (where backups are kept)")
    if settings.database_migration_url is None and settings.behind_pgbouncer:
        # pg_dump's snapshot and the exporting transaction must share one server session,
        # which transaction pooling does not give.
        raise ConfigError(
            "invalid configuration: DATABASE_MIGRATION_URL: not set, and DATABASE_URL goes "
            "through PgBouncer: backups need the direct URL"
        )
    return DirectoryStore(settings.backup_dir, settings.app_name)


def cmd_backup(args: argparse.Namespace) -> int:
    from service.backup.metrics import push_backup_success
    from service.backup.pgtools import BackupError, PgTools
    from service.backup.take import take_backup

    settings = _settings()
    store = _backup_store(settings)
    try:
        result = asyncio.run(
            take_backup(
                url=settings.migration_url(),
                tls=settings.tls_files(),
                store=store,
                tools=PgTools(settings.pg_bin_dir),
                timeout_s=settings.backup_timeout_seconds,
                keep_daily=settings.backup_keep_daily,
                keep_weekly=settings.backup_keep_weekly,
                kind=args.kind,
            )
        )
    except BackupError as exc:
        print(f"backup FAILED: {exc}", file=sys.stderr)
        return 1
    print(
        f"backup {result.backup.name}: {result.size_bytes} bytes, {result.tables} tables, "
        f"{result.rows} rows, {result.duration_s:.1f} s"
    )
    for pruned in result.pruned:
        print(f"pruned {pruned.name}")
    if settings.backup_s3_bucket:
        from service.backup.s3 import S3Store

        bucket = S3Store.from_settings(settings)
        try:
            bucket.upload(result.backup)
            pruned_remote = bucket.prune(
                keep_daily=settings.backup_keep_daily, keep_weekly=settings.backup_keep_weekly
            )
        except BackupError as exc:
            print(f"backup FAILED: {exc}", file=sys.stderr)
            return 1
        print(f"uploaded {result.backup.name} to s3://{bucket.bucket}/{bucket.key_prefix}")
        for gone in pruned_remote:
            print(f"pruned s3 {gone.name}")
    if settings.pushgateway_url:
        _push(
            settings.pushgateway_url,
            "backup",
            lambda: push_backup_success(
                settings.pushgateway_url or "",
                app=settings.app_name,
                finished_at=time.time(),
                size_bytes=result.size_bytes,
                duration_s=result.duration_s,
            ),
        )
    return 0


def _push(url: str, what: str, push: Callable[[], None]) -> None:
    """Push, or say why not: the backup (or drill) itself succeeded, and the age alert will
    notice the missing push."""
    try:
        push()
    except OSError as exc:
        print(f"warning: could not push {what} metrics to {url}: {exc}", file=sys.stderr)
        return
    print(f"pushed {what} metrics to {url}")


def cmd_restore_drill(args: argparse.Namespace) -> int:
    from service.backup.drill import DrillFailedError, RestoreDrill
    from service.backup.metrics import push_drill_success
    from service.backup.pgtools import PgTools

    settings = _settings()
    store = _backup_store(settings)
    with tempfile.TemporaryDirectory(prefix="restore-drill-", dir=settings.backup_dir) as staging:
        if settings.backup_s3_bucket:
            from service.backup.pgtools import BackupError
            from service.backup.s3 import S3Store
            from service.backup.store import DirectoryStore

            try:
                S3Store.from_settings(settings).download_latest(Path(staging))
            except BackupError as exc:
                print(f"restore drill FAILED at download: {exc}", file=sys.stderr)
                return 1
            store = DirectoryStore(Path(staging), settings.app_name)
        drill = RestoreDrill(settings, store, PgTools(settings.pg_bin_dir))
        try:
            result = drill.run()
        except DrillFailedError as exc:
            print(f"restore drill FAILED at {exc}", file=sys.stderr)
            return 1
    if settings.pushgateway_url:
        _push(
            settings.pushgateway_url,
            "drill",
            lambda: push_drill_success(
                settings.pushgateway_url or "",
                app=settings.app_name,
                finished_at=time.time(),
                duration_s=result.duration_s,
                backup_age_s=result.backup_age_s,
            ),
        )
    return 0


def cmd_create_api_key(args: argparse.Namespace) -> int:
    from service.security.api_keys import parse_scopes
    from service.security.key_admin import describe_new_key, issue_api_key

    try:
        scopes = parse_scopes(args.scopes)
    except ValueError as exc:
        print(f"error: --scopes: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    plaintext, key = asyncio.run(
        issue_api_key(_settings(), args.owner, scopes, args.name, args.expires_in_days)
    )
    print(describe_new_key(key, scopes))
    # The plaintext is shown this once, alone on the last line, so scripts can `tail -n1`.
    print(plaintext)
    return 0


def cmd_revoke_api_key(args: argparse.Namespace) -> int:
    from service.security.key_admin import revoke_api_key

    settings = _settings()
    if not asyncio.run(revoke_api_key(settings, args.prefix)):
        print(f"error: no active key with prefix {args.prefix}", file=sys.stderr)
        return 1
    print(
        f"revoked {args.prefix}; running instances stop accepting it within "
        f"{settings.api_key_cache_ttl_seconds:g} s (API_KEY_CACHE_TTL_SECONDS)"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from service.entrypoints.server import serve

    return serve()


def cmd_make_migration(args: argparse.Namespace) -> int:
    from alembic import command

    from service.entrypoints.devserver import dev_database
    from service.migrate import alembic_config, upgrade

    # Autogenerate compares the models with a database at head: the embedded one when
    # DATABASE_URL is unset, like `make run`.
    with dev_database() as overrides:
        url = load_settings(**overrides).migration_url()
        asyncio.run(upgrade(url))
        command.revision(alembic_config(url), message=args.message, autogenerate=True)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from service.entrypoints.devserver import run_dev

    return run_dev()


def cmd_smoke(args: argparse.Namespace) -> int:
    from service.tools.smoke import SmokeCheck, SmokeFailedError, parse_headers

    try:
        SmokeCheck(
            url=args.url,
            api_key=args.api_key,
            metrics_url=args.metrics_url,
            extra_headers=parse_headers(args.header),
            ready_timeout=args.ready_timeout,
        ).run()
    except SmokeFailedError as failure:
        print(f"smoke FAILED: {failure}", file=sys.stderr)
        return 1
    print("smoke passed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_: str) -> Any:
        command = sub.add_parser(name, help=help_, description=help_)
        command.set_defaults(handler=handler)
        return command

    add("check-config", cmd_check_config, "print the effective configuration, secrets masked")
    migrate = add("migrate", cmd_migrate, "upgrade the schema (advisory-locked)")
    migrate.add_argument("--revision", default="head")
    migrate.add_argument("--downgrade", metavar="REVISION", help="downgrade instead (rollback)")
    create = add("create-api-key", cmd_create_api_key, "mint an API key (printed once)")
    create.add_argument("--owner", required=True, help="owner UUID, or a name mapped to one")
    create.add_argument("--scopes", default="tasks:read,tasks:write")
    create.add_argument("--name", default="")
    create.add_argument(
        "--expires-in-days",
        type=_positive_days,
        default=None,
        help="days until the key expires (at least 1); omit for a key that never expires",
    )
    add(
        "grant-app-role",
        cmd_grant_app_role,
        "grant the app role row access only (run as the migration role)",
    ).add_argument("--role", help="default: the user of DATABASE_URL")
    backup = add("backup", cmd_backup, "pg_dump into BACKUP_DIR, then apply retention")
    backup.add_argument("--kind", default="scheduled", help="recorded in the manifest")
    add(
        "restore-drill",
        cmd_restore_drill,
        "restore the latest backup into a scratch database, verify, migrate, smoke, drop",
    )
    revoke = add("revoke-api-key", cmd_revoke_api_key, "revoke an API key by its prefix")
    revoke.add_argument("prefix")
    add("serve", cmd_serve, "run the production server: gunicorn with uvicorn workers")
    add("dev", cmd_dev, "serve on an embedded PostgreSQL (make run)")
    make_migration = add(
        "make-migration", cmd_make_migration, "autogenerate a migration from the models"
    )
    make_migration.add_argument("message")
    smoke = add("smoke", cmd_smoke, "post-deploy check of a running instance")
    smoke.add_argument("--url", required=True, help="base URL, e.g. http://fastapi-app:8000")
    smoke.add_argument("--api-key", required=True)
    smoke.add_argument("--metrics-url", help="e.g. http://fastapi-app:9000/metrics")
    smoke.add_argument(
        "--header", action="append", default=[], help="extra 'Name: value' (gateway secret)"
    )
    smoke.add_argument("--ready-timeout", type=float, default=60.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    return code
