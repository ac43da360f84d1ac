"""JWT bearer auth: HS256 with a shared secret, RS256/ES256 from a JWKS served on loopback."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from hashlib import sha256
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from securitykit import (
    PROBE,
    JwksServer,
    bearer,
    claims,
    ec_key,
    poll_until,
    public_jwk,
    rsa_key,
    security_app,
    token,
)

from service.errors import ServiceUnavailableError
from service.security.jwt import JwksKeys, JwtVerifier
from service.security.principal import owner_id_from
from service.settings import Settings

SECRET = "jwt-shared-secret-for-tests-0123456789abcdef"
ISSUER = "https://issuer.test"
AUDIENCE = "fastapi-app"


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def assert_invalid_token(response: httpx.Response, detail: str | None = None) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'error="invalid_token"' in challenge
    if detail is not None:
        assert response.json()["detail"] == detail


@pytest.fixture
def hs_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(jwt_secret_key=SECRET, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def jwks_settings(make_settings: Callable[..., Settings], jwks_server: JwksServer) -> Settings:
    return make_settings(jwt_jwks_url=jwks_server.url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)


# --- HS256 ----------------------------------------------------------------------------------


async def test_hs256_token_authenticates_its_subject(hs_settings: Settings) -> None:
    async with security_app(hs_settings) as running:
        response = await running.client.get(
            f"{PROBE}/read", headers=bearer(token(SECRET, "HS256", sub="alice"))
        )
        assert response.status_code == 200, response.text
        assert response.json() == {
            "owner_id": str(owner_id_from("alice")),
            "scopes": ["tasks:read", "tasks:write"],
            "auth_method": "jwt",
            "credential_id": "alice",
        }
        # What the access log reads: the subject, never the token.
        assert running.last_scope_state["principal"].credential_id == "alice"


@pytest.mark.parametrize(
    ("scope_claims", "expected"),
    [
        ({"scope": "tasks:read"}, ["tasks:read"]),
        ({"scope": None, "scp": ["tasks:read", "tasks:write"]}, ["tasks:read", "tasks:write"]),
        ({"scope": None, "scp": "tasks:read admin"}, ["admin", "tasks:read"]),
        ({"scope": "tasks:read", "scp": ["tasks:write", 7]}, ["tasks:read", "tasks:write"]),
    ],
)
async def test_scopes_from_scope_or_scp(
    hs_settings: Settings, scope_claims: dict[str, Any], expected: list[str]
) -> None:
    async with security_app(hs_settings) as running:
        response = await running.client.get(
            f"{PROBE}/read", headers=bearer(token(SECRET, "HS256", **scope_claims))
        )
    assert response.status_code == 200, response.text
    assert response.json()["scopes"] == expected


async def test_token_without_the_scope_is_403(hs_settings: Settings) -> None:
    read_only = token(SECRET, "HS256", scope="tasks:read")
    no_scopes = token(SECRET, "HS256", scope=None)
    async with security_app(hs_settings) as running:
        write = await running.client.post(f"{PROBE}/write", headers=bearer(read_only))
        read = await running.client.get(f"{PROBE}/read", headers=bearer(no_scopes))
    assert write.status_code == 403
    assert 'error="insufficient_scope"' in write.headers["WWW-Authenticate"]
    assert read.status_code == 403


def _unsigned(**overrides: Any) -> str:
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims(**overrides))}."


def _tampered() -> str:
    header, payload, signature = token(SECRET, "HS256", sub="alice").split(".")
    forged = b64({**json.loads(base64.urlsafe_b64decode(payload + "==")), "sub": "mallory"})
    return f"{header}.{forged}.{signature}"


@pytest.mark.parametrize(
    ("make_token", "detail"),
    [
        (lambda: token(SECRET, "HS256", exp=int(time.time()) - 120), "Token expired"),
        (lambda: token(SECRET, "HS256", nbf=int(time.time()) + 600), "Token not valid yet"),
        (lambda: token(SECRET, "HS256", aud="another-api"), "Invalid token"),
        (lambda: token(SECRET, "HS256", iss="https://evil.test"), "Invalid token"),
        (lambda: token(SECRET, "HS256", iss=None), "Invalid token"),
        (lambda: token(SECRET, "HS256", aud=None), "Invalid token"),
        (lambda: token(SECRET, "HS256", exp=None), "Invalid token"),
        (lambda: token(SECRET, "HS256", sub=None), "Invalid token"),
        (lambda: token(SECRET, "HS256", sub=" "), "Token has no subject"),
        (lambda: token("another-secret-0123456789abcdef0123", "HS256"), "Invalid token"),
        (_tampered, "Invalid token"),
        (_unsigned, "Token algorithm not accepted"),
        (lambda: token(SECRET * 2, "HS512"), "Token algorithm not accepted"),  # not allow-listed
        (lambda: "not.a.jwt", "Malformed bearer token"),
        (lambda: "garbage", "Malformed bearer token"),
    ],
)
async def test_invalid_tokens_are_401_invalid_token(
    hs_settings: Settings, make_token: Callable[[], str], detail: str
) -> None:
    async with security_app(hs_settings) as running:
        response = await running.client.get(f"{PROBE}/read", headers=bearer(make_token()))
    assert_invalid_token(response, detail)
    assert "principal" not in running.last_scope_state


async def test_leeway_tolerates_small_clock_skew(hs_settings: Settings) -> None:
    now = int(time.time())
    skewed = token(SECRET, "HS256", exp=now - 10, nbf=now + 10, iat=now + 10)
    async with security_app(hs_settings) as running:
        response = await running.client.get(f"{PROBE}/read", headers=bearer(skewed))
    assert response.status_code == 200, response.text


async def test_jwt_in_the_api_key_header_is_refused(hs_settings: Settings) -> None:
    async with security_app(hs_settings) as running:
        response = await running.client.get(
            f"{PROBE}/read", headers={"X-API-Key": token(SECRET, "HS256")}
        )
    assert response.status_code == 401


async def test_without_jwt_configuration_bearer_tokens_are_refused(
    make_settings: Callable[..., Settings],
) -> None:
    async with security_app(make_settings()) as running:
        assert running.state.jwt_verifier is None
        response = await running.client.get(f"{PROBE}/read", headers=bearer(token(SECRET, "HS256")))
    assert response.status_code == 401


# --- JWKS (RS256 / ES256) -----------------------------------------------------------------


async def test_rs256_and_es256_from_jwks_fetched_once(
    jwks_settings: Settings, jwks_server: JwksServer
) -> None:
    rsa_private, ec_private = rsa_key(), ec_key()
    jwks_server.keys = [
        public_jwk(rsa_private, "rsa-1", "RS256"),
        public_jwk(ec_private, "ec-1", "ES256"),
    ]
    async with security_app(jwks_settings) as running:
        for _ in range(3):
            for key, alg, kid in ((rsa_private, "RS256", "rsa-1"), (ec_private, "ES256", "ec-1")):
                response = await running.client.get(
                    f"{PROBE}/read", headers=bearer(token(key, alg, kid=kid, sub="bob"))
                )
                assert response.status_code == 200, response.text
                assert response.json()["owner_id"] == str(owner_id_from("bob"))
    assert jwks_server.fetches == 1


async def test_key_rotation_is_picked_up_and_junk_kids_do_not_hammer_the_idp(
    jwks_settings: Settings, jwks_server: JwksServer
) -> None:
    old, new = rsa_key(), rsa_key()
    jwks_server.keys = [public_jwk(old, "2024", "RS256")]
    async with security_app(jwks_settings) as running:
        get = running.client.get
        assert (
            await get(f"{PROBE}/read", headers=bearer(token(old, "RS256", kid="2024")))
        ).is_success
        assert jwks_server.fetches == 1

        # The IdP publishes a new key and starts signing with it.
        jwks_server.keys = [public_jwk(old, "2024", "RS256"), public_jwk(new, "2025", "RS256")]
        rotated = await get(f"{PROBE}/read", headers=bearer(token(new, "RS256", kid="2025")))
        assert rotated.status_code == 200, rotated.text
        assert jwks_server.fetches == 2

        # Made-up kids are refused without a fetch each (refreshes are rate limited).
        for n in range(10):
            junk = await get(
                f"{PROBE}/read", headers=bearer(token(rsa_key(), "RS256", kid=f"junk-{n}"))
            )
            assert_invalid_token(junk, "Token signed by an unknown key")
        assert jwks_server.fetches == 2
        # Known keys keep working meanwhile.
        assert (
            await get(f"{PROBE}/read", headers=bearer(token(old, "RS256", kid="2024")))
        ).is_success


async def test_token_signed_by_another_key_under_a_known_kid_is_refused(
    jwks_settings: Settings, jwks_server: JwksServer
) -> None:
    jwks_server.keys = [public_jwk(rsa_key(), "k1", "RS256")]
    async with security_app(jwks_settings) as running:
        response = await running.client.get(
            f"{PROBE}/read", headers=bearer(token(rsa_key(), "RS256", kid="k1"))
        )
    assert_invalid_token(response, "Invalid token")


async def test_expired_and_wrong_audience_rs256_tokens(
    jwks_settings: Settings, jwks_server: JwksServer
) -> None:
    private = rsa_key()
    jwks_server.keys = [public_jwk(private, "k1", "RS256")]
    async with security_app(jwks_settings) as running:
        expired = token(private, "RS256", kid="k1", exp=int(time.time()) - 300)
        wrong_aud = token(private, "RS256", kid="k1", aud="someone-else")
        wrong_iss = token(private, "RS256", kid="k1", iss="https://other-idp.test")
        for bad, detail in ((expired, "Token expired"), (wrong_aud, "Invalid token")):
            assert_invalid_token(
                await running.client.get(f"{PROBE}/read", headers=bearer(bad)), detail
            )
        assert_invalid_token(await running.client.get(f"{PROBE}/read", headers=bearer(wrong_iss)))


async def test_algorithm_confusion_is_refused(
    make_settings: Callable[..., Settings], jwks_server: JwksServer
) -> None:
    private = rsa_key()
    jwks_server.keys = [public_jwk(private, "k1", "RS256")]
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # The classic attack: HS256 "signed" with the server's public key as the HMAC secret.
    header = b64({"alg": "HS256", "typ": "JWT", "kid": "k1"})
    payload = b64(claims())
    signature = (
        base64.urlsafe_b64encode(
            hmac.new(public_pem, f"{header}.{payload}".encode(), sha256).digest()
        )
        .rstrip(b"=")
        .decode()
    )
    forged = f"{header}.{payload}.{signature}"
    # Only a JWKS configured: HS256 is not even on the list.
    only_jwks = make_settings(
        jwt_jwks_url=jwks_server.url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE
    )
    # Both configured: HS256 is checked against the shared secret only, never a JWKS key.
    both = make_settings(
        jwt_jwks_url=jwks_server.url,
        jwt_secret_key=SECRET,
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
    )
    for settings, detail in ((only_jwks, "Token algorithm not accepted"), (both, "Invalid token")):
        async with security_app(settings) as running:
            response = await running.client.get(f"{PROBE}/read", headers=bearer(forged))
        assert_invalid_token(response, detail)


async def test_symmetric_keys_published_in_a_jwks_are_ignored(
    jwks_settings: Settings, jwks_server: JwksServer
) -> None:
    shared = "published-by-mistake-0123456789abcdef"
    oct_jwk = json.loads(jwt.get_algorithm_by_name("HS256").to_jwk(shared.encode()))
    jwks_server.keys = [{**oct_jwk, "kid": "oct"}, public_jwk(rsa_key(), "rsa", "RS256")]
    async with security_app(jwks_settings) as running:
        response = await running.client.get(
            f"{PROBE}/read", headers=bearer(token(shared, "HS256", kid="oct"))
        )
    assert_invalid_token(response, "Token algorithm not accepted")


async def test_unreachable_jwks_is_503_not_a_pass(
    make_settings: Callable[..., Settings], jwks_server: JwksServer
) -> None:
    jwks_server.status = 500
    settings = make_settings(jwt_jwks_url=jwks_server.url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    async with security_app(settings) as running:
        response = await running.client.get(
            f"{PROBE}/read", headers=bearer(token(rsa_key(), "RS256", kid="k1"))
        )
    assert response.status_code == 503
    assert response.headers["Retry-After"]


# --- the key cache on its own -----------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=2) as client:
        yield client


def _keys(server: JwksServer, http: httpx.AsyncClient, **kwargs: Any) -> JwksKeys:
    options: dict[str, Any] = {"ttl_seconds": 600, "unknown_kid_refresh_seconds": 30}
    options.update(kwargs)
    return JwksKeys(server.url, http=http, algorithms=frozenset({"RS256", "ES256"}), **options)


async def test_concurrent_lookups_share_one_fetch(
    jwks_server: JwksServer, http: httpx.AsyncClient
) -> None:
    jwks_server.keys = [public_jwk(rsa_key(), "k1", "RS256")]
    keys = _keys(jwks_server, http)
    found = await asyncio.gather(*(keys.key_for("k1") for _ in range(20)))
    assert all(key is not None and key.key_id == "k1" for key in found)
    assert jwks_server.fetches == 1


async def test_keys_are_refetched_after_the_ttl(
    jwks_server: JwksServer, http: httpx.AsyncClient
) -> None:
    jwks_server.keys = [public_jwk(rsa_key(), "k1", "RS256")]
    keys = _keys(jwks_server, http, ttl_seconds=0.2)
    assert await keys.key_for("k1") is not None

    async def refetched() -> bool:
        await keys.key_for("k1")
        return jwks_server.fetches >= 2

    await poll_until(refetched, timeout=3)


async def test_failed_refresh_keeps_serving_cached_keys(
    jwks_server: JwksServer, http: httpx.AsyncClient
) -> None:
    jwks_server.keys = [public_jwk(rsa_key(), "k1", "RS256")]
    keys = _keys(jwks_server, http, ttl_seconds=0.1)
    assert await keys.key_for("k1") is not None
    jwks_server.status = 503

    async def tried_again() -> bool:
        assert await keys.key_for("k1") is not None  # stale but usable
        return jwks_server.fetches >= 2

    await poll_until(tried_again, timeout=3)


async def test_no_keys_at_all_is_service_unavailable_then_recovers(
    jwks_server: JwksServer, http: httpx.AsyncClient
) -> None:
    jwks_server.keys = [{"kty": "RSA", "kid": "broken"}]  # unusable: no modulus
    keys = _keys(jwks_server, http, ttl_seconds=0.1, unknown_kid_refresh_seconds=0)
    with pytest.raises(ServiceUnavailableError):
        await keys.key_for("k1")
    jwks_server.keys = [public_jwk(rsa_key(), "k1", "RS256")]

    async def recovered() -> bool:
        try:
            return await keys.key_for("k1") is not None
        except ServiceUnavailableError:
            return False

    await poll_until(recovered, timeout=3)


async def test_token_without_kid_uses_the_only_key(
    jwks_server: JwksServer, http: httpx.AsyncClient
) -> None:
    jwks_server.keys = [public_jwk(rsa_key(), "only", "RS256")]
    keys = _keys(jwks_server, http)
    only = await keys.key_for(None)
    assert only is not None
    assert only.key_id == "only"
    jwks_server.keys.append(public_jwk(rsa_key(), "second", "RS256"))
    ambiguous = _keys(jwks_server, http)
    assert await ambiguous.key_for(None) is None


def test_owner_of_a_uuid_subject_is_that_uuid() -> None:
    subject = uuid.uuid4()
    assert owner_id_from(str(subject)) == subject


async def test_only_public_signature_keys_of_allowed_algorithms_are_used(
    jwks_server: JwksServer, http: httpx.AsyncClient
) -> None:
    signing = rsa_key()
    jwks_server.keys = [
        "not-an-object",  # type: ignore[list-item]
        {**public_jwk(rsa_key(), "enc", "RS256"), "use": "enc"},
        public_jwk(rsa_key(), "rs384", "RS384"),  # not on the allow-list
        {"kty": "XYZ", "kid": "alien"},
        public_jwk(signing, "good", "RS256"),
    ]
    keys = _keys(jwks_server, http, unknown_kid_refresh_seconds=0)
    assert await keys.key_for("good") is not None
    for kid in ("enc", "rs384", "alien"):
        assert await keys.key_for(kid) is None


@pytest.mark.parametrize("document", [[], {"keys": "nope"}, {"other": []}, {"keys": []}])
async def test_a_document_that_is_not_a_usable_jwk_set_is_unavailable(
    jwks_server: JwksServer, http: httpx.AsyncClient, document: Any
) -> None:
    jwks_server.document = document
    with pytest.raises(ServiceUnavailableError):
        await _keys(jwks_server, http).key_for("k1")


async def test_without_issuer_and_audience_settings_those_claims_are_not_required(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(jwt_secret_key=SECRET)
    async with security_app(settings) as running:
        response = await running.client.get(
            f"{PROBE}/read", headers=bearer(token(SECRET, "HS256", iss=None, aud=None))
        )
    assert response.status_code == 200, response.text


def test_a_verifier_needs_at_least_one_algorithm() -> None:
    with pytest.raises(ValueError, match="no JWT algorithm"):
        JwtVerifier(algorithms=frozenset())
