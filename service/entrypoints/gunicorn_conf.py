"""gunicorn configuration (``python -m service serve``;
``gunicorn -c service/entrypoints/gunicorn_conf.py``).

Every value comes from Settings, so the same variables drive ``make run``, the image and the
chart. Why each one is set as it is:

- ``workers`` = WEB_CONCURRENCY: each uvicorn worker is one event loop on one core; scale pods,
  not workers, beyond the pod's CPU limit.
- ``keepalive`` = GUNICORN_KEEPALIVE (75 s) is longer than the idle timeout of the proxy in front
  (nginx/ALB 60 s), so the proxy closes idle connections first and never sends a request on a
  connection the app is closing.
- ``graceful_timeout`` (20 s): how long in-flight requests get after SIGTERM; the pod's
  terminationGracePeriodSeconds must cover the preStop delay plus this.
- ``timeout`` (30 s): a worker whose event loop has not ticked for this long is blocked (sync
  code in an async route) and gets killed and replaced.
- ``max_requests`` + jitter: recycles workers now and then (bounds slow leaks) without all of
  them restarting at the same moment. A recycling worker asks for its replacement first
  (SIGTTIN, see service/entrypoints/worker.py); ``child_exit`` takes that extra slot back.
- HUP reloads keep capacity: gunicorn forks the new workers and SIGTERMs the old ones at once,
  so until the new ones have booted (1-8 s measured under load) connections wait in the listen
  backlog. ``on_reload`` keeps the old workers' slots and ``pre_fork`` gives each new worker one
  old worker to retire: it sends that one SIGTERM once it serves itself
  (service/entrypoints/worker.py), and ``child_exit`` takes the slot back.
- ``worker_tmp_dir`` on /dev/shm: the heartbeat file gunicorn touches every few seconds stays in
  memory; on a container's overlay filesystem those writes can stall.
- ``forwarded_allow_ips``: client addresses come from X-Forwarded-For only when the peer is one
  of these proxies.
- ``accesslog`` off: the access-log middleware writes one JSON line per request instead.
- ``control_socket_disable``: gunicorn's management socket is not needed in a pod and would
  be created under $HOME, which is read-only there.

The metrics endpoint is served by this master process on METRICS_PORT, aggregated over the
workers' multiprocess files; the API port never serves it.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from service.entrypoints.server import ensure_multiproc_env, prepare_multiproc_dir
from service.settings import EXIT_CONFIG, ConfigError, load_settings

try:
    settings = load_settings()
except ConfigError as error:
    # One clear line and no traceback (gunicorn reports other errors in its config file with
    # one); SystemExit is not an Exception, so gunicorn lets it end the process.
    print(str(error), file=sys.stderr)
    sys.exit(EXIT_CONFIG)
# Before prometheus_client is imported anywhere: it picks its storage mode at import time.
metrics_dir = ensure_multiproc_env(settings)

import structlog  # noqa: E402
from prometheus_client import multiprocess  # noqa: E402

from service.observability.metrics import (  # noqa: E402
    multiprocess_registry,
    start_metrics_server,
    use_fork_aware_pid,
)

use_fork_aware_pid()

# Third-party libraries every worker imports, imported once here so that each worker is forked
# with them loaded: importing them took ~3 s per worker on the 2-core bench machine, two workers
# at once, and a worker boot is what start-up, a recycle and a HUP reload wait for. Libraries
# only, nothing of the service's own: each worker still imports the app, so a HUP reload picks
# up new service code (a new library version comes with a new image, that is, a new pod).
# Importing these starts no thread and opens no connection, so forking after it is safe.
PRELOADED_LIBRARIES = (
    "fastapi",
    "pydantic",
    "sqlalchemy.ext.asyncio",
    "sqlalchemy.orm",
    "sqlalchemy.dialects.postgresql.asyncpg",
    "asyncpg",
    "alembic.runtime.migration",
    "orjson",
    # Only what this configuration uses: the app imports these two only when it does.
    *(("sentry_sdk",) if settings.sentry_dsn is not None else ()),
    *(("httpx",) if settings.jwt_jwks_url else ()),
)
for _library in PRELOADED_LIBRARIES:
    importlib.import_module(_library)

log = structlog.get_logger("service.gunicorn")

wsgi_app = "service.app:create_app_from_env()"
bind = [
    f"[{settings.host}]:{settings.port}"
    if ":" in settings.host
    else f"{settings.host}:{settings.port}"
]
workers = settings.web_concurrency
worker_class = "service.entrypoints.worker.ServiceWorker"
keepalive = settings.gunicorn_keepalive
timeout = settings.gunicorn_timeout
graceful_timeout = settings.gunicorn_graceful_timeout
max_requests = settings.gunicorn_max_requests
max_requests_jitter = settings.gunicorn_max_requests_jitter
forwarded_allow_ips = ",".join(settings.forwarded_allow_ips)
# The heartbeat file lives in memory (tmpfs) when /dev/shm is there, as in every container.
SHM = "/dev/shm"  # noqa: S108 - a tmpfs for gunicorn's heartbeat file, not a temp file name
worker_tmp_dir = SHM if os.path.isdir(SHM) and os.access(SHM, os.W_OK) else None
proc_name = settings.app_name
accesslog = None
errorlog = "-"
loglevel = settings.log_level.lower()
logger_class = "service.observability.gunicorn_logger.GunicornLogger"
control_socket_disable = True
preload_app = False

_metrics_server: Any = None


def on_starting(server: Any) -> None:
    prepare_multiproc_dir(metrics_dir)


def when_ready(server: Any) -> None:
    global _metrics_server
    if not settings.metrics_port:
        log.info("metrics_disabled", reason="METRICS_PORT=0")
        return
    try:
        _metrics_server = start_metrics_server(
            settings.metrics_port, settings.host, multiprocess_registry()
        )
    except OSError as exc:
        log.error("metrics_port_unavailable", port=settings.metrics_port, error=exc.strerror)
        sys.exit(1)
    log.info("metrics_listening", port=settings.metrics_port, path="/metrics")


def post_fork(server: Any, worker: Any) -> None:
    # The worker inherited the master's metrics listening socket; only the master serves it.
    if _metrics_server is not None:
        _metrics_server.socket.close()


def on_reload(server: Any) -> None:
    # Before the new workers are forked; num_workers was just reset to WEB_CONCURRENCY.
    old = sorted(server.WORKERS.values(), key=lambda worker: worker.age)
    server.num_workers += len(old)
    server.reload_handover = [worker.pid for worker in old]


def pre_fork(server: Any, worker: Any) -> None:
    # Runs in the master, so the attribute travels into the forked worker.
    pending = getattr(server, "reload_handover", None)
    worker.retires_pid = pending.pop(0) if pending else None


def child_exit(server: Any, worker: Any) -> None:
    # Drops the dead worker's live gauges (in-progress requests, pool) from the aggregate.
    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
    # A reload's new worker that died before retiring its old one: the next one forked will.
    retires = getattr(worker, "retires_pid", None)
    if retires in server.WORKERS:
        server.reload_handover = [retires, *getattr(server, "reload_handover", [])]
    give_back_replacement_slot(server)


def give_back_replacement_slot(server: Any) -> None:
    """A recycled worker raised the target by one (SIGTTIN) so its replacement could boot
    while it drained, and a reload by the number of old workers; any worker's exit brings the
    target back down towards WEB_CONCURRENCY.

    If a different worker dies first, the target drops early and the recycling one is simply
    not replaced until it exits: the pool is one short for that drain, never one too many.
    """
    if server.num_workers > server.cfg.workers:
        server.num_workers -= 1


def worker_int(worker: Any) -> None:
    log.warning("worker_interrupted", pid=worker.pid)


def worker_abort(worker: Any) -> None:
    log.error("worker_timeout_abort", pid=worker.pid, timeout_s=settings.gunicorn_timeout)
