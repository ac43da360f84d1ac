"""The Tasks routes document their headers, media types and problem responses."""

from __future__ import annotations

from typing import Any

import pytest

from service.app import create_app
from service.settings import load_settings


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    settings = load_settings(
        environment="test", database_url="postgresql+asyncpg://u:p@127.0.0.1:1/none"
    )
    return create_app(settings).openapi()


EXPECTED = {
    ("post", "/v1/tasks"): {"201", "400", "401", "403", "409", "413", "415", "422", "429", "503"},
    ("get", "/v1/tasks"): {"200", "400", "401", "403", "422", "429", "503"},
    ("get", "/v1/tasks/{task_id}"): {"200", "304", "401", "403", "404", "429", "503"},
    ("patch", "/v1/tasks/{task_id}"): {
        "200", "400", "401", "403", "404", "412", "413", "415", "422", "429", "503",
    },
    ("delete", "/v1/tasks/{task_id}"): {"204", "401", "403", "404", "412", "429", "503"},
}  # fmt: skip


@pytest.mark.parametrize(("method", "path"), list(EXPECTED))
def test_routes_document_their_errors_as_problem_json(
    spec: dict[str, Any], method: str, path: str
) -> None:
    operation = spec["paths"][path][method]
    assert operation["summary"]
    assert operation["tags"] == ["tasks"]
    assert EXPECTED[(method, path)] <= set(operation["responses"])
    for status, response in operation["responses"].items():
        if int(status) >= 400:
            content = response["content"]
            assert list(content) == ["application/problem+json"], (status, content)
            assert content["application/problem+json"]["schema"]["$ref"].endswith("/Problem")


@pytest.mark.parametrize(
    ("method", "path", "header"),
    [
        ("post", "/v1/tasks", "Idempotency-Key"),
        ("get", "/v1/tasks/{task_id}", "If-None-Match"),
        ("patch", "/v1/tasks/{task_id}", "If-Match"),
        ("delete", "/v1/tasks/{task_id}", "If-Match"),
    ],
)
def test_conditional_and_idempotency_headers_are_parameters(
    spec: dict[str, Any], method: str, path: str, header: str
) -> None:
    parameters = spec["paths"][path][method]["parameters"]
    (parameter,) = [p for p in parameters if p["name"] == header]
    assert parameter["in"] == "header"
    assert parameter["description"]


def test_response_headers_are_documented(spec: dict[str, Any]) -> None:
    created = spec["paths"]["/v1/tasks"]["post"]["responses"]["201"]
    assert {"Location", "ETag", "Idempotent-Replayed"} <= set(created["headers"])
    fetched = spec["paths"]["/v1/tasks/{task_id}"]["get"]["responses"]
    assert "ETag" in fetched["200"]["headers"]
    assert "ETag" in fetched["304"]["headers"]


def test_patch_accepts_merge_patch(spec: dict[str, Any]) -> None:
    content = spec["paths"]["/v1/tasks/{task_id}"]["patch"]["requestBody"]["content"]
    assert {"application/merge-patch+json", "application/json"} <= set(content)
    patch = spec["components"]["schemas"]["TaskPatch"]
    # Only description and due_at may be null in a patch.
    for name in ("title", "status", "priority", "tags"):
        assert "anyOf" not in patch["properties"][name], name
    for name in ("description", "due_at"):
        assert {"type": "null"} in patch["properties"][name]["anyOf"]
    assert patch["additionalProperties"] is False


def test_schemas_carry_examples(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    for name in ("TaskCreate", "TaskPatch", "TaskOut"):
        assert schemas[name].get("examples"), name
