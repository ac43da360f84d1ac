"""The gunicorn worker: ``uvicorn_worker.UvicornWorker`` with our server options and shutdown.

What it changes:

- uvloop and httptools (when installed), no ``Server`` header, no uvicorn access log (the
  access-log middleware writes one line per request).
- Draining: uvicorn's ``Server.handle_exit`` is the one place a worker learns it must stop
  (gunicorn's master sends SIGTERM on its own SIGTERM, on HUP reloads and on TTOU); reaching
  ``max_requests`` is the other way out. Either flips the app's ``lifecycle.draining``
  (``service.state.AppRuntime``), so ``/health/ready`` answers 503 from the first moment.
- Planned exits lose nothing (docs/reliability.md has the measurements). Upstream uvicorn, on
  shutdown, closes every idle keep-alive connection at once. A client that was writing its next
  request on one at that instant (a proxy's pooled connection, wrk, any busy client) gets a
  reset: nginx re-sends a GET elsewhere, but never a POST, and the client cannot know whether
  its write happened. Here a draining worker stops accepting, then keeps reading its open
  connections for a short while: every request that still arrives is served with
  ``Connection: close`` (the client learns from the response itself not to reuse the
  connection); a connection is closed while idle only once it has been idle for
  ``IDLE_CLOSE_AFTER_SECONDS``, longer than the proxy's own idle timeout for its upstream
  connections (nginx/: 2 s), so the proxy has always closed it first. Closing any sooner
  races the proxy: a request it writes at the instant of the close meets a reset (1 POST in
  3,362 got nginx's 502 in CI with a 1 s threshold and nginx's 60 s timeout).
- Recycling keeps capacity: a worker that reaches ``max_requests`` asks the master for its
  replacement (SIGTTIN: one more worker) and keeps serving, accepting included, until a newer
  worker has started (each worker, once it serves, sends SIGWINCH to its siblings: ignored by
  default, so a sibling still booting is unaffected), at most ``HANDOVER_MAX_SECONDS``; only
  then does it drain. ``child_exit`` in gunicorn_conf.py gives the extra slot back when a
  worker exits. Upstream, the master forks the replacement only after the old worker has
  exited: one worker short for the drain plus the boot.
- Reloads keep capacity the same way: a worker forked by a HUP reload is given one old worker
  to retire (``retires_pid``, set by ``pre_fork`` in gunicorn_conf.py, whose ``on_reload``
  keeps the old workers' slots) and sends it SIGTERM only once it serves itself. Upstream the
  master SIGTERMs every old worker as soon as the new ones are forked, and requests queued in
  the listen backlog for the new workers' boot (1-8 s measured under load).
- uvicorn's own graceful timeout is set a little under gunicorn's, so a request that outlives
  it is cancelled by uvicorn and the lifespan shutdown (engine disposal) still runs, instead of
  the master SIGKILLing the worker with connections open.
- SIGQUIT (gunicorn's quick shutdown, from the master's SIGINT/SIGQUIT) exits at once and runs
  the ``worker_int`` hook; upstream it only set a flag nothing reads, so the worker lingered
  until the master's SIGKILL. SIGABRT (the master's timeout kill) runs ``worker_abort`` and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, cast

from gunicorn.arbiter import Arbiter
from uvicorn.config import Config
from uvicorn.server import Server, ServerState
from uvicorn_worker import UvicornWorker

from service.entrypoints.write_coalescing import CoalescingTransport
from service.state import runtime_of

# Keep this much of gunicorn's graceful_timeout for the lifespan shutdown after uvicorn's drain.
SHUTDOWN_RESERVE_SECONDS = 2
# How long a draining worker keeps reading idle keep-alive connections so that requests already
# on their way get an answer (with Connection: close) instead of a reset.
KEEPALIVE_DRAIN_SECONDS = 4.0
IDLE_CLOSE_AFTER_SECONDS = 3.0
DRAIN_POLL_SECONDS = 0.05
# The longest a recycled worker waits for its replacement to start serving before it drains
# anyway (a worker boots in 1-4 s; a replacement that cannot boot must not keep it forever).
HANDOVER_MAX_SECONDS = 30.0
# "I am serving": sent by a worker that has started to its siblings. Its default action is to
# do nothing, so a sibling that has not installed a handler yet is unaffected.
READY_SIGNAL = signal.SIGWINCH


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class DrainState(ServerState):
    """uvicorn's shared server state plus the one flag the protocol reads."""

    def __init__(self) -> None:
        super().__init__()
        self.draining = False


def _http_protocol() -> type[asyncio.Protocol] | str:
    """httptools' protocol taught to answer with ``Connection: close`` while draining, writing
    each response in one ``send()`` (write_coalescing.py says why)."""
    if not _installed("httptools"):
        return "auto"
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class DrainingHttpToolsProtocol(HttpToolsProtocol):
        idle_since = 0.0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            joined = CoalescingTransport(transport, self.loop)
            super().connection_made(cast(asyncio.Transport, joined))
            self.idle_since = time.monotonic()

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            if getattr(self.server_state, "draining", False) and self.cycle is not None:
                self.cycle.keep_alive = False

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.idle_since = time.monotonic()

    return DrainingHttpToolsProtocol


def _idle(connection: Any) -> bool:
    cycle = getattr(connection, "cycle", None)
    return cycle is None or bool(cycle.response_complete)


def _siblings(master: int, me: int) -> set[int]:
    """The master's other children (Linux /proc; elsewhere none, and the handover times out)."""
    try:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    except OSError:
        return set()
    return {int(pid) for pid in children} - {me}


def _disown(listener: Any) -> None:
    """Let the event loop's server alone close a listening socket's descriptor.

    uvloop closes the descriptor itself and then calls ``close()`` on the socket object it was
    given (gunicorn's wrapper), which closes the same number again: gunicorn's "Error while
    closing socket [Errno 9]" on every worker exit. Detached first, the second close is a no-op.
    """
    inner = getattr(listener, "sock", listener)
    if isinstance(inner, socket.socket):
        inner.detach()


class DrainingServer(Server):
    """uvicorn's server: reports the start of an exit, drains keep-alive connections without
    racing their clients, and hands over before leaving at ``max_requests``."""

    def __init__(
        self,
        config: Config,
        on_exit: Callable[[], None],
        on_retire: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(config)
        self.server_state = DrainState()
        self._on_exit = on_exit
        self._on_retire = on_retire
        self.replacement_ready = False
        self._retire_at: float | None = None
        self.retired = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        done = await super().on_tick(counter)
        if self.should_exit:
            return True
        now = time.monotonic()
        if self._retire_at is None:
            if not done:
                return False
            # max_requests: the replacement boots while this worker still serves. uvicorn's
            # check is switched off so it does not fire (and log) on every later tick.
            self._retire_at = now + HANDOVER_MAX_SECONDS
            self.config.limit_max_requests = None
            self.retired = True
            self._on_retire()
        if now < self._retire_at and not self.replacement_ready:
            return False
        self._on_exit()
        return True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = self.server_state
        assert isinstance(state, DrainState)
        state.draining = True
        for sock in sockets or []:
            _disown(sock)
        for server in self.servers:
            server.close()  # stop accepting; siblings keep the shared listening socket
        for connection in list(state.connections):
            cycle: Any = getattr(connection, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                cycle.keep_alive = False
        # The drain is part of the graceful budget, never added to it: past gunicorn's
        # graceful_timeout the master SIGKILLs the worker and the lifespan shutdown never runs.
        budget = self.config.timeout_graceful_shutdown
        began = time.monotonic()
        deadline = began + (
            min(KEEPALIVE_DRAIN_SECONDS, budget / 2) if budget else KEEPALIVE_DRAIN_SECONDS
        )
        while state.connections and not self.force_exit and time.monotonic() < deadline:
            now = time.monotonic()
            for connection in list(state.connections):
                idle_for = now - getattr(connection, "idle_since", 0.0)
                if _idle(connection) and idle_for >= IDLE_CLOSE_AFTER_SECONDS:
                    connection.transport.close()
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        if budget:
            self.config.timeout_graceful_shutdown = max(int(budget - (time.monotonic() - began)), 1)
        # uvicorn's own shutdown: waits for in-flight requests, then the lifespan shutdown.
        await super().shutdown(sockets=None)


class ServiceWorker(UvicornWorker):  # type: ignore[misc]
    CONFIG_KWARGS: dict[str, Any] = {
        "loop": "uvloop" if _installed("uvloop") else "auto",
        "http": _http_protocol(),
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
        runtime = runtime_of(self.wsgi)
        if runtime is not None:
            runtime.lifecycle.draining = True

    def request_replacement(self) -> None:
        """max_requests reached: one more worker now (child_exit takes the slot back)."""
        self.log.info("Worker %s reached max_requests; replacement requested", self.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.ppid, signal.SIGTTIN)

    def sibling_started(self) -> None:
        if self._server is not None and self._server.retired:
            self._server.replacement_ready = True

    def _announce_when_started(self, server: DrainingServer) -> None:
        if server.should_exit:
            return
        if not server.started:
            asyncio.get_running_loop().call_later(0.05, self._announce_when_started, server)
            return
        siblings = _siblings(self.ppid, self.pid)
        for sibling in siblings:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(sibling, READY_SIGNAL)
        retires = getattr(self, "retires_pid", None)
        if retires in siblings:  # still the master's child: not a recycled pid
            self.log.info("Worker %s serves; retiring %s (reload)", self.pid, retires)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(retires, signal.SIGTERM)

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
        server = self._server = DrainingServer(
            self.config,
            on_exit=self.start_draining,
            on_retire=self.request_replacement,
        )
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGQUIT, self.quick_exit)
        loop.add_signal_handler(READY_SIGNAL, self.sibling_started)
        loop.call_soon(self._announce_when_started, server)
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
