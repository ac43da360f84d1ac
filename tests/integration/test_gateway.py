"""The gateway handshake on the real app: 403 without the secret, probes exempt, rotation."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from securitykit import PROBE, security_app

from service.settings import Settings

CURRENT = "current-gateway-secret-0123456789abcdef"
PREVIOUS = "previous-gateway-secret-0123456789abcdef"
MakeCredential = Callable[..., Awaitable[Any]]


def _gateway_settings(make_settings: Callable[..., Settings], **overrides: Any) -> Settings:
    values: dict[str, Any] = {"gateway_shared_secret": CURRENT}
    values.update(overrides)
    return make_settings(**values)


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"].endswith("/gateway-required")
    assert body["status"] == 403
    # Nothing about what was expected, or which header.
    assert CURRENT not in response.text
    assert "X-Gateway-Secret" not in response.text


async def test_requests_without_or_with_a_wrong_secret_are_refused(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    async with security_app(_gateway_settings(make_settings)) as running:
        get = running.client.get
        # A valid API key does not help: the gateway check comes first.
        assert_refused(await get(f"{PROBE}/read", headers=credential.headers))
        for wrong in ("", "nope", CURRENT[:-1], CURRENT + "x", CURRENT.upper()):
            headers = {**credential.headers, "X-Gateway-Secret": wrong}
            assert_refused(await get(f"{PROBE}/read", headers=headers))
        assert_refused(await get("/v1/does-not-exist"))
        assert_refused(await running.client.post(f"{PROBE}/write", json={"a": 1}))

        ok = await get(f"{PROBE}/read", headers={**credential.headers, "X-Gateway-Secret": CURRENT})
        assert ok.status_code == 200, ok.text


async def test_missing_credential_behind_the_gateway_is_still_401(
    make_settings: Callable[..., Settings],
) -> None:
    async with security_app(_gateway_settings(make_settings)) as running:
        response = await running.client.get(f"{PROBE}/read", headers={"X-Gateway-Secret": CURRENT})
    assert response.status_code == 401


@pytest.mark.parametrize("path", ["/health", "/health/live", "/health/ready"])
async def test_health_probes_need_no_secret(
    make_settings: Callable[..., Settings], path: str
) -> None:
    async with security_app(_gateway_settings(make_settings)) as running:
        response = await running.client.get(path)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/health/other", "/health/live/x"])
async def test_schema_and_docs_need_the_secret(
    make_settings: Callable[..., Settings], path: str
) -> None:
    async with security_app(_gateway_settings(make_settings, docs_enabled=True)) as running:
        assert_refused(await running.client.get(path))
        if path == "/openapi.json":
            # The gateway imports the schema through itself.
            through = await running.client.get(path, headers={"X-Gateway-Secret": CURRENT})
            assert through.status_code == 200
            assert through.json()["openapi"].startswith("3.")


async def test_previous_secret_works_during_rotation(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    rotating = _gateway_settings(make_settings, gateway_shared_secret_previous=PREVIOUS)
    async with security_app(rotating) as running:
        for secret in (CURRENT, PREVIOUS):
            response = await running.client.get(
                f"{PROBE}/read", headers={**credential.headers, "X-Gateway-Secret": secret}
            )
            assert response.status_code == 200, response.text
    # Rotation finished: the previous secret is dropped and stops working.
    async with security_app(_gateway_settings(make_settings)) as running:
        response = await running.client.get(
            f"{PROBE}/read", headers={**credential.headers, "X-Gateway-Secret": PREVIOUS}
        )
    assert_refused(response)


async def test_zuplo_header_name(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    zuplo = _gateway_settings(make_settings, gateway_secret_header="x-zuplo-secret")
    async with security_app(zuplo) as running:
        get = running.client.get
        assert_refused(
            await get(f"{PROBE}/read", headers={**credential.headers, "X-Gateway-Secret": CURRENT})
        )
        # Header names are case-insensitive on the wire.
        for name in ("x-zuplo-secret", "X-Zuplo-Secret"):
            response = await get(f"{PROBE}/read", headers={**credential.headers, name: CURRENT})
            assert response.status_code == 200, response.text


async def test_a_duplicated_secret_header_is_refused(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    async with security_app(_gateway_settings(make_settings)) as running:
        headers = [
            ("X-API-Key", credential.key),
            ("X-Gateway-Secret", CURRENT),
            ("X-Gateway-Secret", "something-else"),
        ]
        response = await running.client.get(f"{PROBE}/read", headers=headers)
    assert_refused(response)


async def test_the_secret_does_not_travel_further_in(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    async with security_app(_gateway_settings(make_settings)) as running:
        response = await running.client.get(
            f"{PROBE}/headers", headers={**credential.headers, "X-Gateway-Secret": CURRENT}
        )
    assert response.status_code == 200
    names = {name.lower() for name in response.json()["names"]}
    assert "x-api-key" in names
    assert "x-gateway-secret" not in names


async def test_no_secret_configured_means_no_check(
    make_settings: Callable[..., Settings], make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    async with security_app(make_settings()) as running:
        response = await running.client.get(f"{PROBE}/read", headers=credential.headers)
    assert response.status_code == 200
