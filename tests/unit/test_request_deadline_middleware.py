"""RequestDeadlineMiddleware without a server: what it answers, and what it leaves alone."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import orjson
import pytest

from service import deadline
from service.middleware.deadline import RequestDeadlineMiddleware

SCOPE: dict[str, Any] = {
    "type": "http",
    "method": "POST",
    "path": "/v1/tasks",
    "raw_path": b"/v1/tasks",
    "query_string": b"",
    "headers": [],
    "state": {"request_id": "abc"},
}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _call(app: Any, seconds: float = 0.05) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    await RequestDeadlineMiddleware(app, seconds=seconds)(dict(SCOPE), _receive, send)
    return sent


def _status_and_body(sent: list[dict[str, Any]]) -> tuple[int, dict[str, str], dict[str, Any]]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], headers, orjson.loads(body)


async def test_a_request_past_its_deadline_is_a_503_with_retry_after() -> None:
    cancelled = asyncio.Event()

    async def stuck(scope: Any, receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()  # the handler itself was cancelled, not left running
            raise

    status, headers, body = _status_and_body(await _call(stuck))
    assert status == 503
    assert headers["content-type"] == "application/problem+json"
    assert headers["retry-after"] == "2"
    assert body["type"].endswith("/request-timeout")
    assert body["request_id"] == "abc"
    assert cancelled.is_set()


async def test_past_the_deadline_with_the_commit_sent_is_a_504_outcome_unknown() -> None:
    async def committing(scope: Any, receive: Any, send: Any) -> None:
        deadline.commit_sending()
        await asyncio.sleep(30)

    status, headers, body = _status_and_body(await _call(committing))
    assert status == 504
    assert body["type"].endswith("/commit-outcome-unknown")
    assert "may or may not" in body["detail"]
    assert headers["retry-after"] == "2"


async def test_progress_is_per_request() -> None:
    async def committing(scope: Any, receive: Any, send: Any) -> None:
        deadline.commit_sending()
        await asyncio.sleep(30)

    async def stuck(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(30)

    first, second = await asyncio.gather(_call(committing), _call(stuck))
    assert _status_and_body(first)[0] == 504
    assert _status_and_body(second)[0] == 503
    deadline.commit_sending()  # outside a request: nothing to record, no error


async def test_someone_elses_timeout_error_is_not_the_deadline() -> None:
    async def raises(scope: Any, receive: Any, send: Any) -> None:
        raise TimeoutError("a driver's own timeout")

    with pytest.raises(TimeoutError, match="driver"):
        await _call(raises, seconds=30)


async def test_a_started_response_is_not_answered_twice() -> None:
    async def slow_body(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(30)

    sent = await _call(slow_body)
    assert [m["type"] for m in sent] == ["http.response.start"]


async def test_zero_turns_it_off() -> None:
    async def quick(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.1)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent = await _call(quick, seconds=0)
    assert sent[0]["status"] == 204
