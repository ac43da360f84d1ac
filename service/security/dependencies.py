"""FastAPI dependencies that authenticate the caller and check scopes.

A credential arrives as ``X-API-Key: <key>`` or ``Authorization: Bearer <key or JWT>``. API keys
are recognised by their ``fa_`` marker; any other bearer token is treated as a JWT when JWT
verification is configured. Behind a gateway with ``GATEWAY_IDENTITY_ENABLED`` the consumer the
gateway authenticated (``service.security.gateway_identity``) is the principal instead. The
principal is put on the request scope so the access log can name it (by key prefix, token
subject or consumer id, never the credential).

The per-principal rate limit (``RATE_LIMIT_DEFAULT``) is applied here, right after the credential
is verified: its budget belongs to the owner, so every key and token of one owner share it.

A route takes ONE dependency for all of this (``ReadPrincipal`` / ``WritePrincipal``), reading
the two headers itself: FastAPI resolves every dependency of the tree on every request, and the
four it took before (scope check, authenticate, ``APIKeyHeader``, ``HTTPBearer``) were a fifth of
a read's CPU. The OpenAPI document still names both schemes on every ``/v1`` operation
(``document_credentials``), as FastAPI did when the scheme objects were dependencies.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.encoders import jsonable_encoder
from fastapi.security import APIKeyHeader, HTTPBearer

from service.errors import UnauthorizedError
from service.http.state import app_state, gateway_principal, set_principal
from service.security.api_keys import looks_like_api_key, require
from service.security.principal import Principal, Scope
from service.security.rate_limit import RateLimitedError

# The schemes as OpenAPI describes them (the credentials are read in ``authenticate``).
api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="An API key (`fa_...`)"
)
bearer = HTTPBearer(auto_error=False, description="An API key or a JWT access token")
SECURITY_SCHEMES = (api_key_header, bearer)


def bearer_credential(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, as ``HTTPBearer`` reads it."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    credentials = credentials.strip()
    if not scheme or scheme.lower() != "bearer" or not credentials:
        return None
    return credentials


async def authenticate(request: Request) -> Principal:
    headers = request.headers
    api_key = headers.get("x-api-key") or None
    credential = api_key or bearer_credential(headers.get("authorization"))
    # Put there by the gateway middleware only on a request with a valid gateway secret, and
    # only with GATEWAY_IDENTITY_ENABLED: the gateway already verified the consumer's key.
    state = app_state(request)
    vouched = gateway_principal(request.scope)
    if vouched is not None:
        principal = vouched
    elif not credential:
        raise UnauthorizedError("Credentials are required", error=None)
    elif looks_like_api_key(credential):
        principal = await state.api_keys.authenticate(credential)
    else:
        verifier = state.jwt_verifier
        if verifier is None or api_key is not None:
            raise UnauthorizedError("Invalid API key")
        principal = await verifier.authenticate(credential)
    # Set before the rate limit so the access log names who was limited.
    set_principal(request.scope, principal)
    limiter = state.rate_limiter
    if limiter is not None:
        exceeded = await limiter.check("principal", str(principal.owner_id))
        if exceeded is not None:
            raise RateLimitedError(exceeded)
    return principal


def require_scope(scope: Scope) -> Callable[[Request], Awaitable[Principal]]:
    async def dependency(request: Request) -> Principal:
        return require(await authenticate(request), scope.value)

    dependency.__name__ = f"require_{scope.value.replace(':', '_')}"
    return dependency


ReadPrincipal = Annotated[Principal, Depends(require_scope(Scope.TASKS_READ))]
WritePrincipal = Annotated[Principal, Depends(require_scope(Scope.TASKS_WRITE))]


def document_credentials(schema: dict[str, Any], path_prefix: str) -> None:
    """Name the credential schemes in ``schema`` (an OpenAPI document) for every operation under
    ``path_prefix``, in the place and form FastAPI gives a security dependency."""
    components = schema.setdefault("components", {})
    components["securitySchemes"] = {
        scheme.scheme_name: jsonable_encoder(scheme.model, by_alias=True, exclude_none=True)
        for scheme in SECURITY_SCHEMES
    }
    requirement: list[dict[str, list[str]]] = [
        {scheme.scheme_name: []} for scheme in SECURITY_SCHEMES
    ]
    for path, operations in schema.get("paths", {}).items():
        if not path.startswith(path_prefix):
            continue
        for method, operation in list(operations.items()):
            # FastAPI puts ``security`` right after ``operationId``; keep the document identical.
            rebuilt: dict[str, Any] = {}
            for key, value in operation.items():
                rebuilt[key] = value
                if key == "operationId":
                    rebuilt["security"] = requirement
            rebuilt.setdefault("security", requirement)
            operations[method] = rebuilt
