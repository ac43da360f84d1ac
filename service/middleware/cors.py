"""CORS: Starlette's middleware, with a refused preflight answered as problem+json.

Starlette answers a preflight it refuses with ``400 text/plain``; every other refusal of this
API is an RFC 9457 problem, so this one is too (same status, the same ``Access-Control-*``
headers, the reason in ``detail``).
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from service.http.problems import problem_response


class ProblemCORSMiddleware(CORSMiddleware):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            headers = Headers(scope=scope)
            if "origin" in headers and "access-control-request-method" in headers:
                preflight = self.preflight_response(request_headers=headers)
                if preflight.status_code >= 400:
                    preflight = problem_response(
                        Request(scope),
                        preflight.status_code,
                        slug="cors-refused",
                        title="CORS preflight refused",
                        detail=bytes(preflight.body).decode(),
                        headers={
                            name: value
                            for name, value in preflight.headers.items()
                            if name.startswith("access-control-")
                        },
                    )
                await preflight(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
