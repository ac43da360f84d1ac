"""``make run``: the API on http://127.0.0.1:8000 with nothing installed beforehand.

Without ``DATABASE_URL`` an embedded PostgreSQL is started under ``.data/postgres`` (kept
across runs), migrated, and given a development API key, stored in ``.data/dev-api-key`` so the
next run reuses it. Ctrl-C stops the server and the database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from service.settings import Settings, load_settings

DATA_DIR = Path(".data")
DEV_KEY_FILE = DATA_DIR / "dev-api-key"
DEV_OWNER = "developer"


async def _ensure_dev_key(settings: Settings) -> tuple[str, bool]:
    from service.db import Database
    from service.security.api_keys import ApiKeyAuthenticator
    from service.security.key_admin import describe_new_key, issue_api_key

    if DEV_KEY_FILE.exists():
        key = DEV_KEY_FILE.read_text().strip()
        database = Database(settings)
        try:
            await ApiKeyAuthenticator(database.sessionmaker, ttl_seconds=0).authenticate(key)
            return key, False
        except Exception:  # noqa: S110 - revoked, expired or from an older database: mint anew
            pass
        finally:
            await database.dispose()
    scopes = ["tasks:read", "tasks:write"]
    key, row = await issue_api_key(settings, DEV_OWNER, scopes, "make run", None)
    print(describe_new_key(row, scopes))
    # With DATABASE_URL set no embedded database has created .data/ (a fresh clone has none).
    DEV_KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
    DEV_KEY_FILE.write_text(key + "\n")
    DEV_KEY_FILE.chmod(0o600)
    return key, True


def run_dev() -> int:
    with dev_database() as overrides:
        return _serve(overrides)


@contextlib.contextmanager
def dev_database() -> Iterator[dict[str, object]]:
    """Settings overrides for the embedded PostgreSQL when ``DATABASE_URL`` is unset.

    The server is stopped when the block exits; with ``DATABASE_URL`` set nothing is started.
    """
    # Through Settings, not os.environ: a DATABASE_URL from .env.development or SECRETS_DIR
    # counts too.
    if load_settings().database_url is not None:
        yield {}
        return
    from service.tools.embedded_postgres import EmbeddedPostgres

    print("DATABASE_URL is not set: starting the embedded PostgreSQL in .data/postgres ...")
    embedded = EmbeddedPostgres(DATA_DIR / "postgres").start()
    print(f"  database: {embedded.libpq_url.replace(embedded.password, '***')}")
    try:
        yield {"database_url": embedded.url}
    finally:
        embedded.stop()
        print("embedded PostgreSQL stopped")


def _serve(overrides: dict[str, object]) -> int:
    from service.app import create_app
    from service.migrate import upgrade

    settings = load_settings(**overrides)
    asyncio.run(upgrade(settings.migration_url()))
    key, created = asyncio.run(_ensure_dev_key(settings))
    base = f"http://{settings.host}:{settings.port}"
    print(f"\nfastapi-app {settings.version} ({settings.environment.value}) on {base}")
    if settings.show_docs:
        print(f"  docs:     {base}/docs")
    if created:
        print(f"  API key (shown once, kept in {DEV_KEY_FILE}):\n    {key}")
    else:
        print(f"  API key:  export API_KEY=$(cat {DEV_KEY_FILE})")
    print("  Ctrl-C stops everything.\n")
    app = create_app(settings)
    if settings.metrics_port:
        # Single process: the app's own registry, on the metrics port (gunicorn's master
        # does this in production).
        from service.http.state import app_runtime
        from service.observability.metrics import start_metrics_server

        start_metrics_server(
            settings.metrics_port, settings.host, app_runtime(app).metrics.registry
        )
        print(f"  metrics:  http://{settings.host}:{settings.metrics_port}/metrics")
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        server_header=False,
    )
    # uvicorn re-raises the Ctrl-C it handled once it has shut down; that is the normal exit.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run()
    return 0
