"""One ``send()`` per response: a transport that joins the writes made in one event-loop turn.

uvicorn's HTTP protocol writes a response in two calls, the status line and headers when the
app sends ``http.response.start`` and the body on ``http.response.body``. With ``TCP_NODELAY``
(uvicorn sets it) each call is its own system call and its own TCP segment, so:

- a proxy can receive the head without the body. If the link to this host then fails, the
  proxy has already passed the head to its client and can neither retry the request elsewhere
  nor finish it: the client gets a truncated response after the proxy's read timeout (the
  failure lab's "app host cut off from nginx" caught one in ~800 reads). Joined, a response
  that fits one segment (every single task, every error) arrives whole or not at all, and a
  read that gets nothing is one nginx re-sends to another instance.
- every response costs two ``send()`` calls and the proxy two reads; joined, one of each.

The writes an app makes for one response happen in the same turn (nothing between
``http.response.start`` and the body awaits anything that suspends), so a flush scheduled with
``call_soon`` sends them together, before any other connection's callbacks run. A streaming
response still streams: each turn's writes go out at the end of that turn.
"""

from __future__ import annotations

import asyncio
from typing import Any


class CoalescingTransport:
    """Wraps a stream transport; ``write`` queues, the end of the loop turn sends."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._pending is None:
            self._pending = [bytes(data)]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(bytes(data))

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()  # a response written just before close (Connection: close) still goes out
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        queued = sum(map(len, self._pending)) if self._pending else 0
        return self._transport.get_write_buffer_size() + queued

    def __getattr__(self, name: str) -> Any:
        # Everything else (is_closing, pause/resume_reading, get_extra_info, set_protocol…)
        # is the wrapped transport's.
        return getattr(self._transport, name)
