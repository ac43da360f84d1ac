"""Host header allow-list (ALLOWED_HOSTS), with the health probes exempt.

Starlette's ``TrustedHostMiddleware`` validates the patterns (exact names and ``*.example.com``);
this subclass changes two things. The kubelet probes a pod by its IP, so its ``Host`` header is
``10.x.y.z:8000``, never one of the public names: ``/health/*`` is exempt (the probes reveal
nothing and take no input), so readiness keeps working with a strict list. And a refused host
gets a problem+json 400 like every other error, instead of a text/plain one.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.http.problems import problem_response

HEALTH_PREFIX = "/health"


def host_name(raw: str | None) -> str | None:
    """The host part of a Host header (port and IPv6 brackets removed), lower-cased."""
    if not raw:
        return None
    raw = raw.strip().lower()
    if raw.startswith("["):
        end = raw.find("]")
        return raw[1:end] if end > 0 else None
    return raw.rsplit(":", 1)[0] if raw.count(":") == 1 else raw


class TrustedHostsMiddleware(TrustedHostMiddleware):
    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        # Host names are case-insensitive (RFC 9110 4.2.3): compare lower-cased on both sides.
        super().__init__(
            app, allowed_hosts=[host.lower() for host in allowed_hosts], www_redirect=False
        )

    def is_allowed(self, host: str | None) -> bool:
        if host is None:
            return False
        return any(
            host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:]))
            for pattern in self.allowed_hosts
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.allow_any
            or scope["type"] != "http"
            or scope["path"] == HEALTH_PREFIX
            or scope["path"].startswith(HEALTH_PREFIX + "/")
        ):
            await self.app(scope, receive, send)
            return
        host: str | None = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = host_name(value.decode("latin-1"))
                break
        if self.is_allowed(host):
            await self.app(scope, receive, send)
            return
        response = problem_response(
            Request(scope), 400, slug="invalid-host", detail="The Host header is not allowed"
        )
        await response(scope, receive, send)
