"""Security headers, CSP for the docs, CORS, trusted hosts and the streaming body limit."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from service.settings import Settings

AppClient = Callable[[Settings], Any]
MakeCredential = Callable[..., Awaitable[Any]]


async def test_api_responses_carry_strict_headers(client: httpx.AsyncClient) -> None:
    for response in (await client.get("/health/live"), await client.get("/nope")):
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert headers["cache-control"] == "no-store"
        # Not in the test environment: HSTS belongs where TLS terminates in front (staging/prod).
        assert "strict-transport-security" not in headers
        assert "server" not in headers


async def test_hsts_in_staging_and_production(
    make_settings: Callable[..., Settings], app_client: AppClient
) -> None:
    async with app_client(make_settings(environment="staging")) as client:
        response = await client.get("/health/live")
    assert response.headers["strict-transport-security"].startswith("max-age=63072000")


def _csp_allows(policy: str, directive: str, url: str) -> bool:
    sources = next(
        (part.split()[1:] for part in policy.split(";") if part.split()[:1] == [directive]), []
    )
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))
    return origin in sources or ("'self'" in sources and not urlsplit(url).netloc)


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
async def test_docs_pages_get_a_policy_that_lets_them_load(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path)
    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    html = response.text
    scripts = re.findall(r'<script[^>]*src="([^"]+)"', html)
    styles = re.findall(r'<link[^>]*href="([^"]+)"[^>]*rel="stylesheet"', html) + re.findall(
        r'<link[^>]*rel="stylesheet"[^>]*href="([^"]+)"', html
    )
    assert scripts
    for url in scripts:
        assert _csp_allows(policy, "script-src", url), (url, policy)
    for url in styles:
        assert _csp_allows(policy, "style-src", url), (url, policy)
    if re.search(r"<script>\s*\S", html):  # an inline bootstrap script
        assert "'unsafe-inline'" in policy.split("script-src")[1].split(";")[0]
    assert "frame-ancestors 'none'" in policy
    assert "connect-src 'self'" in policy  # fetching /openapi.json
    # The relaxed policy stays on the docs: the API next door keeps the strict one.
    other = await client.get("/openapi.json")
    assert other.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"


async def test_docs_switch_keeps_the_schema_available(
    make_settings: Callable[..., Settings], app_client: AppClient
) -> None:
    async with app_client(make_settings(docs_enabled=False)) as client:
        docs, redoc, schema = (
            await client.get("/docs"),
            await client.get("/redoc"),
            await client.get("/openapi.json"),
        )
    assert docs.status_code == 404
    assert redoc.status_code == 404
    assert schema.status_code == 200
    assert "/v1/tasks" in schema.json()["paths"]


def test_docs_default_off_only_in_production(make_settings: Callable[..., Settings]) -> None:
    assert make_settings().show_docs
    production = make_settings(
        environment="production", gateway_required=False, log_level="WARNING"
    )
    assert not production.show_docs


# --- CORS -------------------------------------------------------------------------------------

ORIGIN = "https://app.example.com"


@pytest.fixture
async def cors_client(
    make_settings: Callable[..., Settings], app_client: AppClient
) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(make_settings(cors_origins=ORIGIN)) as client:
        yield client


async def test_cors_preflight_from_a_listed_origin(cors_client: httpx.AsyncClient) -> None:
    response = await cors_client.options(
        "/v1/tasks",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key, content-type, idempotency-key",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "x-api-key" in allowed
    assert "idempotency-key" in allowed
    methods = {m.strip() for m in response.headers["access-control-allow-methods"].split(",")}
    assert methods == {"GET", "POST", "PATCH", "DELETE", "OPTIONS"}  # no route takes PUT


async def test_cors_refuses_other_origins_and_never_wildcards(
    cors_client: httpx.AsyncClient, make_settings: Callable[..., Settings]
) -> None:
    preflight = await cors_client.options(
        "/v1/tasks",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers
    simple = await cors_client.get("/health/live", headers={"Origin": ORIGIN})
    assert simple.headers["access-control-allow-origin"] == ORIGIN
    exposed = {
        h.strip().lower() for h in simple.headers["access-control-expose-headers"].split(",")
    }
    # What a browser client needs to read: ids, ETags, the replay marker, retry hints.
    assert {"x-request-id", "etag", "location", "idempotent-replayed", "retry-after"} <= exposed
    with pytest.raises(Exception, match="not allowed"):
        make_settings(cors_origins="*")


# --- trusted hosts ----------------------------------------------------------------------------


async def test_trusted_hosts_refuse_others_but_probes_answer_any_host(
    make_settings: Callable[..., Settings], app_client: AppClient
) -> None:
    settings = make_settings(allowed_hosts="API.example.com,*.Internal.example.com")
    async with app_client(settings) as client:
        good = await client.get("/v1/tasks", headers={"Host": "api.EXAMPLE.com"})
        wildcard = await client.get("/v1/tasks", headers={"Host": "a.internal.example.com:8443"})
        bad = await client.get("/v1/tasks", headers={"Host": "evil.example.com"})
        # The kubelet probes by pod IP.
        probes = [
            await client.get(path, headers={"Host": "10.1.2.3:8000"})
            for path in ("/health/live", "/health/ready", "/health")
        ]
    assert good.status_code == 401  # past the host check, stopped by auth
    assert wildcard.status_code == 401
    assert bad.status_code == 400
    assert bad.headers["content-type"] == "application/problem+json"
    assert bad.json()["type"].endswith("/invalid-host")
    assert bad.headers["x-request-id"] == bad.json()["request_id"]
    assert [p.status_code for p in probes] == [200, 200, 200]


# --- body limit -------------------------------------------------------------------------------

LIMIT = 4096


@pytest.fixture
async def limited(
    make_settings: Callable[..., Settings], app_client: AppClient
) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(make_settings(max_request_body_bytes=LIMIT)) as client:
        yield client


async def test_declared_oversize_body_is_refused_before_reading(
    limited: httpx.AsyncClient, make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    body = b'{"title": "' + b"x" * (LIMIT * 2) + b'"}'
    response = await limited.post(
        "/v1/tasks",
        content=body,
        headers={**credential.headers, "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 413
    assert response.headers["x-request-id"] == response.json()["request_id"]
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_chunked_body_is_cut_off_once_over_the_limit(
    limited: httpx.AsyncClient, make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"title": "'
        for _ in range(1000):  # up to ~1 MB if nobody stopped reading
            sent += 1024
            yield b"x" * 1024
        yield b'"}'

    response = await limited.post(
        "/v1/tasks",
        content=chunks(),
        headers={**credential.headers, "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    # Reading stopped at the limit: the rest of the stream was never pulled.
    assert sent <= LIMIT + 2 * 1024


async def test_body_within_the_limit_passes(
    limited: httpx.AsyncClient, make_credential: MakeCredential
) -> None:
    credential = await make_credential()
    response = await limited.post(
        "/v1/tasks",
        json={"title": "fits"},
        headers=credential.headers,
    )
    assert response.status_code == 201, response.text
