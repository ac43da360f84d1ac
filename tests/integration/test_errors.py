"""Every error leaves as RFC 9457 problem+json with the request id, through the whole stack."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

import appkit
from service.settings import Settings
from testkit import free_port

MakeCredential = Callable[..., Awaitable[Any]]
AppClient = Callable[[Settings], Any]


def assert_problem(
    response: httpx.Response, status: int, slug: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"].startswith("https://")
    if slug:
        assert body["type"].endswith("/" + slug)
    assert body["title"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["instance"] == response.request.url.path
    # Hardening headers apply to errors too.
    assert response.headers["x-content-type-options"] == "nosniff"
    return body


async def test_400_malformed_json(
    client: httpx.AsyncClient, make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    response = await client.post(
        "/v1/tasks",
        content=b'{"title": ',
        headers={**credential.headers, "Content-Type": "application/json"},
    )
    assert_problem(response, 400, "malformed-json")


async def test_404_unknown_path(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/no/such/thing"), 404, "not-found")


async def test_405_wrong_method(client: httpx.AsyncClient) -> None:
    response = await client.delete("/health/live")
    assert_problem(response, 405)
    assert "GET" in response.headers["allow"]


async def test_413_body_too_large(
    make_settings: Callable[..., Settings],
    app_client: AppClient,
    make_credential: MakeCredential,
) -> None:
    credential = await make_credential()
    async with app_client(make_settings(max_request_body_bytes=1024)) as client:
        response = await client.post(
            "/v1/tasks", json={"title": "x" * 2048}, headers=credential.headers
        )
    assert_problem(response, 413)


async def test_415_unsupported_media_type(
    client: httpx.AsyncClient, make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    response = await client.post(
        "/v1/tasks",
        content=b"title=x",
        headers={**credential.headers, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_problem(response, 415)


async def test_422_lists_the_invalid_fields(
    client: httpx.AsyncClient, make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    response = await client.post("/v1/tasks", json={"title": ""}, headers=credential.headers)
    body = assert_problem(response, 422, "validation-error")
    assert body["errors"]
    assert all({"pointer", "detail"} <= set(error) for error in body["errors"])


async def test_500_hides_the_exception(
    make_settings: Callable[..., Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    def add_boom(app: FastAPI) -> None:
        @app.get("/_test/boom")
        async def boom() -> None:
            raise ValueError("password=hunter2 in SELECT * FROM api_keys")

    async with appkit.serving(make_settings(), prepare=add_boom) as served:
        response = await served.client.get("/_test/boom")
    body = assert_problem(response, 500)
    assert "quote the request_id" in body["detail"]
    logged = capsys.readouterr().out
    for leak in ("hunter2", "SELECT", "ValueError", "Traceback"):
        assert leak not in response.text
    # The log names the exception type and place, never its message or traceback.
    for leak in ("hunter2", "SELECT", "Traceback"):
        assert leak not in logged


async def test_503_when_the_database_is_down(
    make_settings: Callable[..., Settings],
    app_client: AppClient,
    make_credential: MakeCredential,
) -> None:
    credential = await make_credential()
    down = f"postgresql+asyncpg://app:pw@127.0.0.1:{free_port()}/app"
    async with app_client(make_settings(database_url=down, database_connect_timeout=1)) as client:
        response = await client.get("/v1/tasks", headers=credential.headers)
        ready = await client.get("/health/ready")
        live = await client.get("/health/live")
    assert_problem(response, 503)
    assert int(response.headers["retry-after"]) > 0
    assert_problem(ready, 503)
    assert live.status_code == 200
