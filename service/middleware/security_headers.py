"""Browser-facing hardening headers on every response (pure ASGI).

API responses are JSON for programs: nothing in them should ever be rendered, framed, cached by
a shared cache or allowed to load anything, hence ``default-src 'none'`` and ``no-store``.

The interactive docs (``/docs``, ``/redoc``) are HTML pages that FastAPI builds to load Swagger
UI / ReDoc from the jsDelivr CDN and start them with an inline bootstrap script (Swagger) or
inline styles and a blob: web worker (ReDoc). Their policy allows exactly that: scripts and
styles from ``'self'`` and cdn.jsdelivr.net, ``'unsafe-inline'`` for the bootstrap (its content
depends on the mount path and root_path, so a hash would have to be recomputed per deployment;
the page embeds nothing from the request, so there is nothing to inject into), Google Fonts for
ReDoc, the FastAPI favicon, ``connect-src 'self'`` for ``/openapi.json``. Those relaxations apply
to the docs paths only; ``DOCS_ENABLED=false`` (the production default) removes the pages.

A header a route set itself (a ``Cache-Control`` for instance) is left as it is. HSTS is sent
only in staging and production, where TLS terminates in front of the service.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_CSP = "default-src 'none'; frame-ancestors 'none'"
DOCS_CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self' https://cdn.jsdelivr.net 'unsafe-inline'",
        "style-src 'self' https://cdn.jsdelivr.net https://fonts.googleapis.com 'unsafe-inline'",
        "font-src https://fonts.gstatic.com",
        "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly",
        "connect-src 'self'",
        "worker-src blob:",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'none'",
    ]
)
HSTS = "max-age=63072000; includeSubDomains"

Headers = list[tuple[bytes, bytes]]


def _encode(pairs: Iterable[tuple[str, str]]) -> Headers:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in pairs]


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp, *, hsts: bool, docs_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.docs_paths = tuple(docs_paths)
        common = [
            ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", "DENY"),
            ("Referrer-Policy", "no-referrer"),
            ("Cache-Control", "no-store"),
        ]
        if hsts:
            common.append(("Strict-Transport-Security", HSTS))
        self.api_headers = _encode([*common, ("Content-Security-Policy", API_CSP)])
        self.docs_headers = _encode([*common, ("Content-Security-Policy", DOCS_CSP)])

    def headers_for(self, path: str) -> Headers:
        if self.docs_paths and path.startswith(self.docs_paths):
            return self.docs_headers
        return self.api_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = self.headers_for(scope["path"])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers.extend(pair for pair in extra if pair[0] not in present)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
