"""A PostgreSQL wire-protocol tap: a loopback TCP proxy that counts what clients send.

Put between the app and a real PostgreSQL, it sees every message of the frontend protocol and
counts, per connection and in total:

- round trips: each ``Sync``, simple ``Query`` and ``Flush`` makes the client wait for the
  server, so their number is the number of times a request waited on the network;
- statements: each ``Execute`` (extended protocol, with the SQL its ``Bind`` names) and each
  simple ``Query``, in order;
- ``Parse`` messages: a statement prepared again instead of served from the driver's cache.

It answers an ``SSLRequest``/``GSSENCRequest`` itself with "N" (no encryption), so a client
with ``ssl=prefer`` continues in plaintext that the tap can read. Nothing else is changed.
Runs on the caller's event loop: ``async with WireTap(host, port) as tap:``.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102


@dataclass
class WireCounts:
    round_trips: int = 0
    parses: int = 0
    statements: list[str] = field(default_factory=list)

    def reset(self) -> None:
        self.round_trips = 0
        self.parses = 0
        self.statements.clear()


@dataclass
class _Connection:
    prepared: dict[str, str] = field(default_factory=dict)  # statement name -> SQL
    portals: dict[str, str] = field(default_factory=dict)  # portal name -> SQL


def _cstring(buffer: bytes, offset: int) -> tuple[str, int]:
    end = buffer.index(b"\x00", offset)
    return buffer[offset:end].decode("utf-8", "replace"), end + 1


class WireTap:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.counts = WireCounts()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> WireTap:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self._server.wait_closed()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self._spawn(self._pipe(up_reader, writer))
        try:
            await self._client_to_server(reader, writer, up_writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            up_writer.close()
            writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _client_to_server(
        self,
        reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        server: asyncio.StreamWriter,
    ) -> None:
        # Untyped start-up messages until the StartupMessage (or a cancel request) passes.
        while True:
            header = await reader.readexactly(8)
            length, code = struct.unpack("!ii", header)
            body = await reader.readexactly(length - 8)
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                client.write(b"N")
                await client.drain()
                continue
            server.write(header + body)
            await server.drain()
            if code == CANCEL_REQUEST:
                return
            break
        connection = _Connection()
        while True:
            kind = await reader.readexactly(1)
            length_bytes = await reader.readexactly(4)
            (length,) = struct.unpack("!i", length_bytes)
            body = await reader.readexactly(length - 4)
            self._count(connection, kind, body)
            server.write(kind + length_bytes + body)
            await server.drain()

    def _count(self, connection: _Connection, kind: bytes, body: bytes) -> None:
        counts = self.counts
        if kind in (b"S", b"H"):
            counts.round_trips += 1
        elif kind == b"Q":
            counts.round_trips += 1
            counts.statements.append(_cstring(body, 0)[0].strip())
        elif kind == b"P":
            counts.parses += 1
            name, offset = _cstring(body, 0)
            connection.prepared[name] = _cstring(body, offset)[0].strip()
        elif kind == b"B":
            portal, offset = _cstring(body, 0)
            statement, _ = _cstring(body, offset)
            connection.portals[portal] = connection.prepared.get(statement, "?")
        elif kind == b"E":
            portal, _ = _cstring(body, 0)
            counts.statements.append(connection.portals.get(portal, "?"))
