"""Pure ASGI middleware enforcing the gateway handshake (see ``service.security.gateway``).

Every request except the health probes must carry exactly one accepted secret in the configured
header, or it is refused with 403 problem+json before anything else runs. That includes
``/openapi.json`` and ``/docs``: the gateway imports the schema through itself, and a direct
caller learns nothing about the API. The header is removed before the request goes further in,
so no handler, error report or inner log can echo it.

With gateway-trusted identity on, an accepted request also hands its consumer headers to
``GatewayIdentity``: the principal they name is put on the request state for ``authenticate``,
and the headers are removed. A refused request that carried a consumer header is logged.
"""

from __future__ import annotations

import structlog
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.http.problems import problem_response
from service.http.state import set_gateway_principal
from service.middleware.probes import is_probe
from service.security.gateway import GatewaySecrets
from service.security.gateway_identity import GatewayIdentity

log = structlog.get_logger("service.middleware.gateway")

# RFC 6455 1008: policy violation.
WEBSOCKET_POLICY_VIOLATION = 1008


class GatewaySecretMiddleware:
    def __init__(
        self, app: ASGIApp, *, secrets: GatewaySecrets, identity: GatewayIdentity | None = None
    ) -> None:
        self.app = app
        self.secrets = secrets
        self.identity = identity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in {"http", "websocket"} or is_probe(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = self.secrets.header
        headers = scope["headers"]
        presented = [value for name, value in headers if name == header]
        # Exactly one: two values would mean something between us and the gateway appended one.
        if len(presented) == 1 and self.secrets.accepts(presented[0]):
            # In place, not a copy: the access log outside reads the matched route (and the
            # principal) from this scope, and it must not see the secret either.
            scope["headers"] = [(name, value) for name, value in headers if name != header]
            if self.identity is not None:
                principal, scope["headers"] = self.identity.take(scope["headers"])
                if principal is not None:
                    set_gateway_principal(scope, principal)
            await self.app(scope, receive, send)
            return
        if self.identity is not None and self.identity.presented(headers):
            # Ignored (the request is refused anyway), but worth a line: a client that names a
            # consumer without the secret is forging the gateway or bypassing it.
            log.warning("gateway_consumer_ignored", reason="no valid gateway secret")
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": WEBSOCKET_POLICY_VIOLATION})
            return
        response = problem_response(
            Request(scope),
            403,
            slug="gateway-required",
            detail="This API is served only through its API gateway",
        )
        await response(scope, receive, send)
