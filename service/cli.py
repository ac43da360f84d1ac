"""``python -m service <command>``: the operator's entry points.

Each command loads Settings itself, so a bad variable stops it with one clear line (exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from service.settings import ConfigError, Settings, load_settings

EXIT_CONFIG = 2


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
    from service.migrate import downgrade, upgrade

    # _settings() configured logging: the migration Job's output goes to the same pipeline as
    # the server's, JSON lines outside development, redacted.
    settings = _settings()
    url = settings.migration_url()
    # The outcome is logged (migrate_done / migrate_downgraded); the line for people is printed
    # only where the logs are for people too.
    for_people = settings.resolved_log_format == "console"
    if args.downgrade:
        asyncio.run(downgrade(url, args.downgrade))
        if for_people:
            print(f"downgraded to {args.downgrade}")
        return 0
    before, after = asyncio.run(upgrade(url, args.revision))
    if for_people:
        print(f"schema: {','.join(sorted(before)) or 'empty'} -> {','.join(sorted(after))}")
    return 0


async def _create_key(
    settings: Settings, owner: str, scopes: list[str], name: str, expires_days: int | None
) -> str:
    from service.db import Database
    from service.security.api_keys import ApiKeyRepository
    from service.security.principal import owner_id_from

    database = Database(settings)
    expires_at = (
        datetime.now(UTC) + timedelta(days=expires_days) if expires_days is not None else None
    )
    try:
        async for session in database.session():
            plaintext, key = await ApiKeyRepository(session).create(
                owner_id=owner_id_from(owner), scopes=scopes, name=name, expires_at=expires_at
            )
            print(f"created key {key.prefix} for owner {key.owner_id} scopes {','.join(scopes)}")
    finally:
        await database.dispose()
    return plaintext


def cmd_create_api_key(args: argparse.Namespace) -> int:
    from service.security.api_keys import parse_scopes

    try:
        scopes = parse_scopes(args.scopes)
    except ValueError as exc:
        print(f"error: --scopes: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    plaintext = asyncio.run(
        _create_key(_settings(), args.owner, scopes, args.name, args.expires_in_days)
    )
    # The plaintext is shown this once, alone on the last line, so scripts can `tail -n1`.
    print(plaintext)
    return 0


async def _revoke_key(settings: Settings, prefix: str) -> bool:
    from service.db import Database
    from service.security.api_keys import ApiKeyRepository

    database = Database(settings)
    try:
        async for session in database.session():
            revoked = await ApiKeyRepository(session).revoke(prefix)
    finally:
        await database.dispose()
    return revoked


def cmd_revoke_api_key(args: argparse.Namespace) -> int:
    settings = _settings()
    if not asyncio.run(_revoke_key(settings, args.prefix)):
        print(f"error: no active key with prefix {args.prefix}", file=sys.stderr)
        return 1
    print(
        f"revoked {args.prefix}; running instances stop accepting it within "
        f"{settings.api_key_cache_ttl_seconds:g} s (API_KEY_CACHE_TTL_SECONDS)"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from service.server import serve

    return serve()


def cmd_make_migration(args: argparse.Namespace) -> int:
    from alembic import command

    from service.devserver import dev_database
    from service.migrate import alembic_config, upgrade

    # Autogenerate compares the models with a database at head: the embedded one when
    # DATABASE_URL is unset, like `make run`.
    with dev_database() as overrides:
        url = load_settings(**overrides).migration_url()
        asyncio.run(upgrade(url))
        command.revision(alembic_config(url), message=args.message, autogenerate=True)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from service.devserver import run_dev

    return run_dev()


def cmd_smoke(args: argparse.Namespace) -> int:
    from service.smoke import SmokeCheck, SmokeFailedError, parse_headers

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
