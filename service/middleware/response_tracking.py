"""Whether a response has started: what a pure-ASGI middleware must know before it may answer
in the app's place (once ``http.response.start`` is sent, nothing else can be)."""

from __future__ import annotations

from starlette.types import Message, Send


class TrackedSend:
    """``send``, remembering whether the response has started."""

    __slots__ = ("response_started", "send")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.response_started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.response_started = True
        await self.send(message)
