"""FastAPI dependencies that authenticate the caller and check scopes.

A credential arrives as ``X-API-Key: <key>`` or ``Authorization: Bearer <key or JWT>``. API keys
are recognised by their ``fa_`` marker; any other bearer token is treated as a JWT when JWT
verification is configured. Behind a gateway with ``GATEWAY_IDENTITY_ENABLED`` the consumer the
gateway authenticated (``service.security.gateway_identity``) is the principal instead. The
principal is put on the request scope so the access log can name it (by key prefix, token
subject or consumer id, never the credential).

The per-principal rate limit (``RATE_LIMIT_DEFAULT``) is applied here, right after the credential
is verified: its budget belongs to the owner, so every key and token of one owner share it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.errors import UnauthorizedError
from service.http.state import app_state, gateway_principal, set_principal
from service.security.api_keys import looks_like_api_key, require
from service.security.principal import Principal, Scope
from service.security.rate_limit import RateLimitedError

# auto_error=False: the problem+json 401 below is ours, with WWW-Authenticate.
api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="An API key (`fa_...`)"
)
bearer = HTTPBearer(auto_error=False, description="An API key or a JWT access token")


async def authenticate(
    request: Request,
    api_key: Annotated[str | None, Depends(api_key_header)],
    authorization: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    credential = api_key or (authorization.credentials if authorization else None)
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


def require_scope(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    async def dependency(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        return require(principal, scope.value)

    dependency.__name__ = f"require_{scope.value.replace(':', '_')}"
    return dependency


ReadPrincipal = Annotated[Principal, Depends(require_scope(Scope.TASKS_READ))]
WritePrincipal = Annotated[Principal, Depends(require_scope(Scope.TASKS_WRITE))]
