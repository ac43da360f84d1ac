"""Each response leaves the worker in one ``send()``: head and body together, so a proxy never
holds a head whose body a failing link cut off (service/entrypoints/write_coalescing.py).

The worker's real HTTP protocol serves a real TCP connection; the only thing added is a
recorder between the event loop's transport and the protocol, counting what reaches the socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from uvicorn.config import Config

from service.entrypoints.worker import DrainState, _http_protocol
from service.entrypoints.write_coalescing import CoalescingTransport

BODY = b'{"id":"5b0c","title":"write the report"}'


class RecordingTransport:
    """The loop's transport, noting each write that reaches it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await asyncio.sleep(0.3)  # the first chunk must be on the wire before this ends
        await send({"type": "http.response.body", "body": b"second", "more_body": False})
        return
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
    if path == "/close":
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, list[RecordingTransport]]]:
    protocol_class = _http_protocol()
    if isinstance(protocol_class, str):
        pytest.skip("httptools is not installed: the worker uses uvicorn's default protocol")
    config = Config(app, lifespan="off", access_log=False)
    config.load()
    state = DrainState()
    recorders: list[RecordingTransport] = []

    class Recorded(protocol_class):  # type: ignore[misc,valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:
            recorders.append(RecordingTransport(transport))
            super().connection_made(cast(asyncio.Transport, recorders[-1]))

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Recorded(config=config, server_state=state, app_state={}),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, recorders
    finally:
        for connection in list(state.connections):
            connection.transport.close()
        server.close()
        await server.wait_closed()


async def _exchange(
    port: int, request: bytes, until: bytes, times: int = 1
) -> tuple[bytes, list[float]]:
    """Send ``request``; read until ``until`` appeared ``times``; when each piece arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    writer.write(request)
    received = b""
    arrivals: list[float] = []
    while received.count(until) < times:
        chunk = await asyncio.wait_for(reader.read(65536), timeout=5)
        if not chunk:
            break
        received += chunk
        arrivals.append(loop.time())
    writer.close()
    return received, arrivals


async def test_a_response_is_one_write_with_head_and_body(
    served: tuple[int, list[RecordingTransport]],
) -> None:
    port, recorders = served
    request = b"GET /task HTTP/1.1\r\nHost: t\r\n\r\n"
    received, _ = await _exchange(port, request * 3, BODY, times=3)
    # Three pipelined requests on one connection: three answers, each one write, each whole.
    assert received.count(b"HTTP/1.1 200 OK") == 3
    assert len(recorders) == 1
    writes = recorders[0].writes
    assert len(writes) == 3, writes
    for write in writes:
        assert write.startswith(b"HTTP/1.1 200 OK\r\n"), write
        assert write.endswith(BODY), write


async def test_a_response_before_close_is_sent_before_the_close(
    served: tuple[int, list[RecordingTransport]],
) -> None:
    port, recorders = served
    received, _ = await _exchange(port, b"GET /close HTTP/1.1\r\nHost: t\r\n\r\n", BODY)
    assert received.endswith(BODY)
    assert b"connection: close" in received.lower()
    assert len(recorders[0].writes) == 1


async def test_a_streaming_response_still_streams(
    served: tuple[int, list[RecordingTransport]],
) -> None:
    port, recorders = served
    received, arrivals = await _exchange(
        port, b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n", b"0\r\n\r\n"
    )
    assert b"first" in received
    assert b"second" in received
    # Head and first chunk went out together, then the rest 0.3 s later: not held back.
    writes = recorders[0].writes
    assert len(writes) == 2, writes
    assert b"first" in writes[0]
    assert b"second" not in writes[0]
    assert arrivals[-1] - arrivals[0] >= 0.2, arrivals


class _Socketless:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> Any:
        return ("192.0.2.7", 40000) if name == "peername" else None


async def test_an_abort_drops_what_is_queued_and_a_closed_peer_gets_nothing() -> None:
    loop = asyncio.get_running_loop()
    aborted = _Socketless()
    joined = CoalescingTransport(cast(asyncio.Transport, aborted), loop)
    joined.write(b"head")
    assert joined.get_write_buffer_size() == 4
    joined.abort()
    await asyncio.sleep(0)
    assert aborted.aborted
    assert aborted.writes == []

    gone = _Socketless()
    joined = CoalescingTransport(cast(asyncio.Transport, gone), loop)
    joined.writelines([b"head", b"body"])
    gone.closing = True  # the peer went away within the turn
    await asyncio.sleep(0)
    assert gone.writes == []

    kept = _Socketless()
    joined = CoalescingTransport(cast(asyncio.Transport, kept), loop)
    joined.write(b"head")
    joined.write(memoryview(b"body"))
    assert kept.writes == []  # nothing goes out within the turn…
    await asyncio.sleep(0)
    assert kept.writes == [b"headbody"]  # …and all of it at its end
    # Anything else is the wrapped transport's own (uvicorn reads addresses this way).
    assert joined.get_extra_info("peername") == ("192.0.2.7", 40000)
