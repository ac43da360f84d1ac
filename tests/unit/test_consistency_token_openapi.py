"""The consistency token is part of the API's contract: documented where clients look for it."""

from __future__ import annotations

from typing import Any

from service.app import CORS_ALLOW_HEADERS, CORS_EXPOSE_HEADERS, create_app
from service.settings import load_settings

TOKEN = "Consistency-Token"


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = create_app(load_settings(environment="test")).openapi()
    return schema


def test_writes_document_the_token_they_return() -> None:
    paths = _schema()["paths"]
    for path, method, status in (
        ("/v1/tasks", "post", "201"),
        ("/v1/tasks/{task_id}", "patch", "200"),
        ("/v1/tasks/{task_id}", "delete", "204"),
    ):
        headers = paths[path][method]["responses"][status]["headers"]
        assert TOKEN in headers, (path, method)
        assert "send it back" in headers[TOKEN]["description"]


def test_reads_document_the_token_they_accept() -> None:
    paths = _schema()["paths"]
    for path in ("/v1/tasks", "/v1/tasks/{task_id}"):
        (parameter,) = [p for p in paths[path]["get"]["parameters"] if p["name"] == TOKEN]
        assert parameter["in"] == "header"
        assert not parameter["required"]
        assert parameter["schema"]["type"] == "string"
        assert parameter["schema"]["pattern"] == "^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$"


def test_browsers_may_send_and_read_it() -> None:
    assert TOKEN in CORS_ALLOW_HEADERS
    assert TOKEN in CORS_EXPOSE_HEADERS
