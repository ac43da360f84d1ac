"""JWT bearer tokens: HS256 with a shared secret, or RS256/ES256 with keys from a JWKS URL.

Which algorithms a token may use is decided here, never by the token: HMAC algorithms only when
``JWT_SECRET_KEY`` is set, asymmetric ones only when ``JWT_JWKS_URL`` is set, and ``none``
never. An HMAC token is checked against the shared secret only and an asymmetric one against a
JWKS key only, so a public key can never be replayed as an HMAC secret (algorithm confusion).

The JWKS document is fetched with an async HTTP client (PyJWKClient would block the event loop),
cached for ``JWKS_CACHE_TTL_SECONDS``, and refreshed early when a token names an unknown ``kid``
(a key rotation) - at most once per ``unknown_kid_refresh_seconds``, so tokens with made-up kids
cannot turn us into a load generator against the identity provider.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import jwt
import structlog

from service.errors import ServiceUnavailableError, UnauthorizedError
from service.security.algorithms import (
    ASYMMETRIC_ALGORITHMS,
    HMAC_ALGORITHMS,
    effective_algorithms,
)
from service.security.principal import Principal, owner_id_from
from service.settings import Settings

if TYPE_CHECKING:
    import httpx

log = structlog.get_logger("service.security.jwt")

JWKS_FETCH_TIMEOUT_SECONDS = 3.0
UNKNOWN_KID_REFRESH_SECONDS = 30.0
# After a failed fetch, keep serving the cached keys and try again this much later.
FAILED_FETCH_RETRY_SECONDS = 10.0


class JwksKeys:
    """The signing keys of a JWKS URL, cached, refreshed on expiry or on an unknown ``kid``."""

    def __init__(
        self,
        url: str,
        *,
        http: httpx.AsyncClient,
        algorithms: frozenset[str],
        ttl_seconds: float,
        unknown_kid_refresh_seconds: float = UNKNOWN_KID_REFRESH_SECONDS,
    ) -> None:
        self.url = url
        self._http = http
        self._algorithms = algorithms & ASYMMETRIC_ALGORITHMS
        self._ttl = ttl_seconds
        self._unknown_kid_interval = unknown_kid_refresh_seconds
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._refresh_due = 0.0
        self._next_unknown_kid_refresh = 0.0
        self._generation = 0
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def key_for(self, kid: str | None) -> jwt.PyJWK | None:
        refreshed = False
        if time.monotonic() >= self._refresh_due:
            await self._refresh()
            refreshed = True
        key = self._lookup(kid)
        now = time.monotonic()
        if key is None and not refreshed and now >= self._next_unknown_kid_refresh:
            self._next_unknown_kid_refresh = now + self._unknown_kid_interval
            await self._refresh()
            key = self._lookup(kid)
        if not self._keys:
            raise ServiceUnavailableError("Token signing keys are unavailable; retry shortly")
        return key

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:
            # A token without kid is unambiguous only when the set holds a single key.
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        seen = self._generation
        async with self._lock:
            if self._generation != seen:
                return  # another request refreshed while this one waited: single flight
            try:
                keys = await self._fetch()
            except Exception as exc:
                # Keep the keys we have (an IdP hiccup must not log everyone out); a request
                # with no usable key at all gets 503 from key_for.
                self._refresh_due = time.monotonic() + min(self._ttl, FAILED_FETCH_RETRY_SECONDS)
                log.warning("jwks_fetch_failed", url=self.url, error_type=type(exc).__name__)
            else:
                self._keys = keys
                self._refresh_due = time.monotonic() + self._ttl
            finally:
                self._generation += 1

    async def _fetch(self) -> dict[str | None, jwt.PyJWK]:
        self.fetches += 1
        response = await self._http.get(self.url, headers={"Accept": "application/json"})
        response.raise_for_status()
        document = response.json()
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ValueError("not a JWK Set")
        keys = {key.key_id: key for key in self._usable(entries)}
        if not keys:
            raise ValueError("no usable signing keys in the JWK Set")
        return keys

    def _usable(self, entries: list[Any]) -> Iterable[jwt.PyJWK]:
        for entry in entries:
            # Only public signature keys: an "oct" key in a JWKS would be a shared secret
            # published to the world, and "enc" keys are not for signatures.
            if not isinstance(entry, dict) or entry.get("kty") == "oct":
                continue
            if entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue
            if key.algorithm_name in self._algorithms:
                yield key


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """Scopes from ``scope`` (RFC 8693: space-separated) and/or ``scp`` (list or string)."""
    found: set[str] = set()
    for claim in ("scope", "scp"):
        value = claims.get(claim)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(item for item in value if isinstance(item, str) and item)
    return frozenset(found)


class JwtVerifier:
    """Turns a bearer JWT into a Principal or raises UnauthorizedError (401 invalid_token)."""

    def __init__(
        self,
        *,
        algorithms: frozenset[str],
        secret: str | None = None,
        jwks: JwksKeys | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_seconds: float = 30,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        if not algorithms:
            raise ValueError("no JWT algorithm is usable with the configured keys")
        self.algorithms = algorithms
        self._secret = secret
        self.jwks = jwks
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds
        self._http = http
        required = ["exp", "sub"]
        if issuer:
            required.append("iss")
        if audience:
            required.append("aud")
        self._options: dict[str, Any] = {"require": required}

    async def authenticate(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise UnauthorizedError("Malformed bearer token") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
            raise UnauthorizedError("Token algorithm not accepted")
        key: jwt.PyJWK | str
        if algorithm in HMAC_ALGORITHMS:
            assert self._secret is not None  # guaranteed by effective_algorithms
            key = self._secret
        else:
            assert self.jwks is not None
            kid = header.get("kid")
            found = await self.jwks.key_for(kid if isinstance(kid, str) else None)
            if found is None:
                raise UnauthorizedError("Token signed by an unknown key")
            key = found
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options=self._options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise UnauthorizedError("Token expired") from None
        except jwt.ImmatureSignatureError:
            raise UnauthorizedError("Token not valid yet") from None
        except jwt.PyJWTError:
            # Which check failed (signature, issuer, audience) is not the caller's business.
            raise UnauthorizedError("Invalid token") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.strip():
            raise UnauthorizedError("Token has no subject")
        return Principal(
            owner_id=owner_id_from(subject),
            scopes=_scopes(claims),
            auth_method="jwt",
            credential_id=subject,
        )

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()


def build_jwt_verifier(settings: Settings) -> JwtVerifier | None:
    """The verifier for these settings, or None when JWT auth is not configured."""
    secret = settings.jwt_secret_key.get_secret_value() if settings.jwt_secret_key else None
    jwks_url = settings.jwt_jwks_url
    if secret is None and not jwks_url:
        return None
    algorithms = effective_algorithms(
        settings.jwt_algorithms, has_secret=secret is not None, has_jwks=bool(jwks_url)
    )
    http: httpx.AsyncClient | None = None
    jwks: JwksKeys | None = None
    if jwks_url:
        # Imported here: only a JWKS needs an HTTP client, and httpx is ~0.2 s of every start.
        import httpx

        http = httpx.AsyncClient(timeout=JWKS_FETCH_TIMEOUT_SECONDS, follow_redirects=False)
        jwks = JwksKeys(
            jwks_url,
            http=http,
            algorithms=algorithms,
            ttl_seconds=settings.jwks_cache_ttl_seconds,
        )
    return JwtVerifier(
        algorithms=algorithms,
        secret=secret,
        jwks=jwks,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        leeway_seconds=settings.jwt_leeway_seconds,
        http=http,
    )
