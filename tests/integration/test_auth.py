"""The authenticate dependency: where credentials come from, 401 vs 403, the principal for logs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from securitykit import PROBE, security_app

from service.settings import Settings

MakeCredential = Callable[..., Awaitable[Any]]


def assert_401(response: httpx.Response, detail: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 401
    assert body["type"].endswith("/unauthorized")
    assert body["detail"] == detail
    assert body["instance"] == f"{PROBE}/read"
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="fastapi-app"')
    assert "ApiKey" in challenge
    # RFC 6750 3.1: no error code when no credential was sent, invalid_token for a bad one.
    if detail == "Credentials are required":
        assert "error=" not in challenge
    else:
        assert 'error="invalid_token"' in challenge


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "Credentials are required"),
        ({"X-API-Key": ""}, "Credentials are required"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "Credentials are required"),
        ({"Authorization": "Bearer"}, "Credentials are required"),
        ({"X-API-Key": "fa_short_secret"}, "Malformed API key"),
        ({"X-API-Key": "fa_tooshort"}, "Invalid API key"),
        ({"X-API-Key": "not-a-key-at-all"}, "Invalid API key"),
        ({"Authorization": "Bearer fa_zzzzzzzzzzzz_" + "x" * 43}, "Invalid API key"),
        # No JWT verifier configured: a non-key bearer token cannot be anything valid.
        ({"Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig"}, "Invalid API key"),
    ],
)
async def test_missing_or_invalid_credentials_are_401(
    make_settings: Callable[..., Settings], headers: dict[str, str], detail: str
) -> None:
    async with security_app(make_settings()) as running:
        response = await running.client.get(f"{PROBE}/read", headers=headers)
        assert "principal" not in running.last_scope_state
    assert_401(response, detail)
    for value in headers.values():
        if len(value) > 20:
            assert value not in response.text  # never echoed back


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
async def test_key_in_authorization_bearer(
    make_settings: Callable[..., Settings], make_credential: MakeCredential, scheme: str
) -> None:
    credential = await make_credential()
    async with security_app(make_settings()) as running:
        response = await running.client.get(
            f"{PROBE}/read", headers={"Authorization": f"{scheme} {credential.key}"}
        )
    assert response.status_code == 200, response.text
    assert response.json()["credential_id"] == credential.prefix
    assert response.json()["auth_method"] == "api_key"


async def test_x_api_key_takes_precedence_and_never_falls_back(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    good = await make_credential()
    async with security_app(make_settings()) as running:
        get = running.client.get
        both_good_first = await get(
            f"{PROBE}/read",
            headers={"X-API-Key": good.key, "Authorization": "Bearer something-else"},
        )
        bad_first = await get(
            f"{PROBE}/read",
            headers={
                "X-API-Key": "fa_zzzzzzzzzzzz_" + "y" * 43,
                "Authorization": f"Bearer {good.key}",
            },
        )
    assert both_good_first.status_code == 200
    # A wrong X-API-Key is a failure, not a reason to try the other header.
    assert bad_first.status_code == 401


async def test_scopes_decide_403_and_admin_implies_all(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    reader = await make_credential(scopes=("tasks:read",))
    writer = await make_credential(scopes=("tasks:write",))
    admin = await make_credential(scopes=("admin",))
    async with security_app(make_settings()) as running:
        client = running.client
        denied = await client.post(f"{PROBE}/write", headers=reader.headers)
        assert denied.status_code == 403
        assert denied.headers["content-type"] == "application/problem+json"
        assert denied.json()["detail"] == "This credential lacks the 'tasks:write' scope"
        assert 'error="insufficient_scope"' in denied.headers["WWW-Authenticate"]
        # A 403 still names the caller in the access log.
        assert running.last_scope_state["principal"].credential_id == reader.prefix

        assert (await client.get(f"{PROBE}/read", headers=writer.headers)).status_code == 403
        assert (await client.post(f"{PROBE}/write", headers=writer.headers)).status_code == 200
        assert (await client.get(f"{PROBE}/admin", headers=reader.headers)).status_code == 403
        for path, method in (("/read", "GET"), ("/write", "POST"), ("/admin", "GET")):
            response = await client.request(method, f"{PROBE}{path}", headers=admin.headers)
            assert response.status_code == 200, (path, response.text)


async def test_principal_is_on_the_request_scope_for_the_access_log(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    async with security_app(make_settings()) as running:
        response = await running.client.get(f"{PROBE}/read", headers=credential.headers)
        principal = running.last_scope_state["principal"]
    assert response.status_code == 200
    assert principal.credential_id == credential.prefix
    assert principal.owner_id == credential.owner_id
    assert credential.key not in repr(principal)


async def test_openapi_documents_both_security_schemes(
    make_settings: Callable[..., Settings],
) -> None:
    async with security_app(make_settings()) as running:
        schema = (await running.client.get("/openapi.json")).json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "An API key (`fa_...`)",
    }
    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    assert {"APIKeyHeader": []} in schema["paths"][f"{PROBE}/read"]["get"]["security"]
