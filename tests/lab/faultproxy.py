"""A small fault-injecting TCP proxy: latency per burst, resets, and nothing else.

It runs an asyncio loop in a thread of the test process, inside a lab host's namespace (the
listening socket and the upstream connections are created there). The test changes its
behaviour at any time:

- ``delay = 0.5``: every burst of bytes (one read, either direction) waits 0.5 s before it is
  forwarded: a slow link or an overloaded database host, as seen from the client.
- ``reset_all()``: every open connection is closed with an RST (SO_LINGER 0), both sides.
- ``refuse = True``: new connections are reset at once.

Blackholes are not the proxy's job: iptables in the router drops packets (tests/lab/netlab.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable

from netlab import enter

CHUNK = 65536


class FaultProxy:
    def __init__(self, namespace: str, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.namespace = namespace
        self.listen = listen
        self.upstream = upstream
        self.delay = 0.0
        self.refuse = False
        self.connections = 0  # accepted so far
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)

    # --- control (any thread) -------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("the fault proxy did not start")
        if self._errors:
            raise self._errors[0]
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)

    def reset_all(self) -> None:
        self._call(self._reset_all)

    def open_connections(self) -> int:
        return len(self._writers) // 2

    def _call(self, function: Callable[[], None]) -> None:
        assert self._loop is not None
        done = threading.Event()

        def run() -> None:
            try:
                function()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(5)

    # --- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            enter(self.namespace)
            loop = self._loop = asyncio.new_event_loop()
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, *self.listen, reuse_address=True)
            )
        except BaseException as exc:
            self._errors.append(exc)
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            self._reset_all()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.refuse:
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort(writer)
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
        finally:
            self._writers -= {writer, up_writer}
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def _reset_all(self) -> None:
        for writer in list(self._writers):
            _abort(writer)
        self._writers.clear()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
