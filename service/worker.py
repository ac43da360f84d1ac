"""The gunicorn worker: ``uvicorn_worker.UvicornWorker`` with our server options and shutdown.

What it changes:

- uvloop and httptools (when installed), no ``Server`` header, no uvicorn access log (the
  access-log middleware writes one line per request).
- Draining: uvicorn's ``Server.handle_exit`` is the one place a worker learns it must stop
  (gunicorn's master sends SIGTERM on its own SIGTERM, on HUP reloads and on TTOU). The server
  subclass flips ``app.state.lifecycle.draining`` there, so ``/health/ready`` answers 503 from the
  first moment. In practice few requests see it: uvicorn stops accepting and closes idle
  keep-alive connections within 0.1 s; it matters for requests that arrive on a keep-alive
  connection already open (a proxy's pool) while in-flight ones finish. Taking the pod out of
  the load balancer is the job of the preStop delay (see the README), not of this probe.
- uvicorn's own graceful timeout is set a little under gunicorn's, so a request that outlives
  it is cancelled by uvicorn and the lifespan shutdown (engine disposal) still runs, instead of
  the master SIGKILLing the worker with connections open.
- SIGQUIT (gunicorn's quick shutdown, from the master's SIGINT/SIGQUIT) exits at once and runs
  the ``worker_int`` hook; upstream it only set a flag nothing reads, so the worker lingered
  until the master's SIGKILL. SIGABRT (the master's timeout kill) runs ``worker_abort`` and exits.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from gunicorn.arbiter import Arbiter
from uvicorn.config import Config
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

# Keep this much of gunicorn's graceful_timeout for the lifespan shutdown after uvicorn's drain.
SHUTDOWN_RESERVE_SECONDS = 2


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class DrainingServer(Server):
    """uvicorn's server, reporting the start of a graceful exit to the application."""

    def __init__(self, config: Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


class ServiceWorker(UvicornWorker):  # type: ignore[misc]
    CONFIG_KWARGS: dict[str, Any] = {
        "loop": "uvloop" if _installed("uvloop") else "auto",
        "http": "httptools" if _installed("httptools") else "auto",
        "server_header": False,
        "access_log": False,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.timeout_graceful_shutdown = max(
            self.cfg.graceful_timeout - SHUTDOWN_RESERVE_SECONDS, 1
        )
        self._server: DrainingServer | None = None

    def init_signals(self) -> None:
        super().init_signals()
        signal.signal(signal.SIGABRT, self.handle_abort)

    def handle_abort(self, sig: int, frame: FrameType | None) -> None:
        self.alive = False
        self.cfg.worker_abort(self)
        # Not sys.exit(): the signal lands in the blocked request's task, where uvicorn catches
        # SystemExit, answers 500 and keeps the stuck worker alive. The master replaces it.
        os._exit(1)

    def start_draining(self) -> None:
        lifecycle = getattr(getattr(self.wsgi, "state", None), "lifecycle", None)
        if lifecycle is not None:
            lifecycle.draining = True

    def quick_exit(self) -> None:
        self.cfg.worker_int(self)
        self.start_draining()
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        # Everything imported and built so far (FastAPI, SQLAlchemy, pydantic: ~10^5 objects)
        # lives as long as the worker. Frozen, no later collection scans it again (the collector
        # took ~10% of a busy worker's CPU in the profile; full collections are its costly part).
        gc.collect()
        gc.freeze()
        server = self._server = DrainingServer(self.config, on_exit=self.start_draining)
        asyncio.get_running_loop().add_signal_handler(signal.SIGQUIT, self.quick_exit)
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
