"""The OpenAPI document, and schemathesis against the app: no 5xx, no response off the schema.

The app runs in this process, in uvicorn on a loopback port in a background thread (its own
event loop, its own lifespan), against the real PostgreSQL; schemathesis generates requests
from ``/openapi.json`` with a valid API key and validates every response against the schema.
The budget is small and fixed (``FUZZ_MAX_EXAMPLES``, default 12 per operation), so it stays a
test rather than a fuzzing campaign; ``make fuzz`` runs a larger one against the stack.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import given
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.app import create_app
from service.settings import Settings
from testkit import free_port, fuzz_settings, wait_until

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "12"))


async def test_security_schemes_and_problem_responses_are_documented(
    client: httpx.AsyncClient,
) -> None:
    schema = (await client.get("/openapi.json")).json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": schemes["APIKeyHeader"]["description"],
    }
    assert schemes["HTTPBearer"]["type"] == "http"
    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    assert {tag["name"] for tag in schema["tags"]} >= {"tasks", "health"}
    assert "Problem" in schema["components"]["schemas"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary"), (method, path)
            assert operation.get("tags"), (method, path)
            if path.startswith("/v1/"):
                assert operation.get("security"), (method, path)
                for status in ("401", "503"):
                    content = operation["responses"][status]["content"]
                    assert content["application/problem+json"]["schema"] == {
                        "$ref": "#/components/schemas/Problem"
                    }
                # A write whose COMMIT got no answer is a 504 commit-outcome-unknown (issue 15);
                # a read never commits anything.
                outcome_unknown = operation["responses"].get("504")
                if method in {"post", "patch", "delete"}:
                    assert outcome_unknown is not None, (method, path)
                    example = outcome_unknown["content"]["application/problem+json"]["example"]
                    assert example["type"].endswith("/commit-outcome-unknown")
                else:
                    assert outcome_unknown is None, (method, path)


@pytest.fixture(scope="module")
async def api_key(make_credential: Callable[..., Awaitable[Any]]) -> str:
    credential = await make_credential()
    key: str = credential.key
    return key


@pytest.fixture(scope="module")
def served_app(make_settings: Callable[..., Settings]) -> Iterator[str]:
    """The real app in uvicorn, on its own thread and event loop."""
    port = free_port()
    config = uvicorn.Config(
        create_app(make_settings()),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=20, what="uvicorn started")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def fuzz(operation: Any, base_url: str, api_key: str, excluded: list[Any]) -> None:
    """Run schemathesis' generated cases for one operation; raises its failure group."""

    @given(case=operation.as_strategy())
    @fuzz_settings(MAX_EXAMPLES)
    def check(case: Any) -> None:
        if case.headers and "Idempotency-Key" in case.headers:
            # A client makes a new key per new request; schemathesis reuses its examples, and a
            # reused key with another body is (rightly) a 422.
            case.headers["Idempotency-Key"] = f"schemathesis-{uuid.uuid4()}"
        case.call_and_validate(
            base_url=base_url, headers={"X-API-Key": api_key}, excluded_checks=excluded
        )

    check()


def test_api_conforms_to_its_schema(served_app: str, api_key: str) -> None:
    schema = schemathesis.openapi.from_url(served_app + "/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 8
    for operation in operations:
        # `cursor` is an opaque token the API issued; any other string is a documented 400
        # invalid-cursor, which no schema can express (it is the server's secret).
        excluded = [positive_data_acceptance] if operation.label == "GET /v1/tasks" else []
        try:
            fuzz(operation, served_app, api_key, excluded)
        except Exception as failure:  # collect every operation's findings, then report
            failures.append(f"{operation.label}: {failure}")
    assert not failures, "\n\n".join(failures)
