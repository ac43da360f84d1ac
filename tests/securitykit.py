"""Test helpers for the security suites: an app with probe routes, tokens, a JWKS server.

The probe routes depend only on the auth dependencies (no session, no query), so a test can
count exactly what authentication itself costs and does not depend on the tasks domain.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import APIRouter, Depends, Request

from service.app import create_app
from service.security.dependencies import ReadPrincipal, WritePrincipal, require_scope
from service.security.principal import Principal, Scope
from service.settings import Settings
from service.state import AppState

PROBE = "/v1/_probe"
AdminPrincipal = Annotated[Principal, Depends(require_scope(Scope.ADMIN))]


def _describe(principal: Principal) -> dict[str, Any]:
    return {
        "owner_id": str(principal.owner_id),
        "scopes": sorted(principal.scopes),
        "auth_method": principal.auth_method,
        "credential_id": principal.credential_id,
    }


def probe_router() -> APIRouter:
    router = APIRouter(prefix=PROBE)

    @router.get("/read")
    async def read(principal: ReadPrincipal) -> dict[str, Any]:
        return _describe(principal)

    @router.post("/write")
    async def write(principal: WritePrincipal) -> dict[str, Any]:
        return _describe(principal)

    @router.get("/admin")
    async def admin(principal: AdminPrincipal) -> dict[str, Any]:
        return _describe(principal)

    @router.get("/headers")
    async def header_names(request: Request) -> dict[str, Any]:
        # Names only: what reached the handler, never the values.
        return {"names": sorted(request.headers.keys())}

    return router


@dataclass
class RunningApp:
    client: httpx.AsyncClient
    state: AppState
    lifespan_state: dict[str, Any] = field(default_factory=dict)
    asgi: Any = None
    # What the access log would see: scope["state"] of the last request, after it finished.
    last_scope_state: dict[str, Any] = field(default_factory=dict)

    def client_from(self, ip: str) -> httpx.AsyncClient:
        """Another client on the same app, connecting from ``ip`` (close it after use)."""
        transport = httpx.ASGITransport(app=self.asgi, client=(ip, 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@asynccontextmanager
async def security_app(
    settings: Settings, *, client_ip: str = "127.0.0.1"
) -> AsyncIterator[RunningApp]:
    """The real app (real middleware, real lifespan) plus the probe routes, served in-process."""
    app = create_app(settings)
    app.include_router(probe_router())
    async with app.router.lifespan_context(app) as state:
        lifespan_state = dict(state or {})
        running = RunningApp(
            client=None,  # type: ignore[arg-type]
            state=lifespan_state["app_state"],
            lifespan_state=lifespan_state,
        )

        async def asgi(scope: Any, receive: Any, send: Any) -> None:
            scope["state"] = dict(running.lifespan_state)
            running.last_scope_state = scope["state"]
            await app(scope, receive, send)

        running.asgi = asgi
        transport = httpx.ASGITransport(app=asgi, client=(client_ip, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            running.client = client
            yield running


async def poll_until(
    condition: Callable[[], Awaitable[bool]], *, timeout: float, interval: float = 0.05
) -> float:
    """Await ``condition`` until true; the seconds it took. Fails after ``timeout``."""
    import asyncio

    started = time.monotonic()
    while True:
        if await condition():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


# --- tokens ----------------------------------------------------------------------------------


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(private_key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.get_algorithm_by_name(alg)
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(private_key.public_key()))
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return jwk


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "sub": str(uuid.uuid4()),
        "iss": "https://issuer.test",
        "aud": "fastapi-app",
        "iat": now,
        "exp": now + 300,
        "scope": "tasks:read tasks:write",
    }
    values.update(overrides)
    return {name: value for name, value in values.items() if value is not None}


def token(key: Any, alg: str, *, kid: str | None = None, **overrides: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(**overrides), key, algorithm=alg, headers=headers)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


# --- a JWKS server on loopback ---------------------------------------------------------------


class JwksServer:
    """Serves ``{"keys": [...]}`` at /jwks.json from a thread; counts the fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        # When set, served instead of {"keys": keys}.
        self.document: Any = None
        self.fetches = 0
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                document = outer.document if outer.document is not None else {"keys": outer.keys}
                body = json.dumps(document).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}/jwks.json"

    def start(self) -> JwksServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
