#!/usr/bin/env python3
"""Generate the Zuplo routes (config/routes.oas.json) from the service's own OpenAPI document.

    make zuplo-routes                              # write it
    .venv/bin/python zuplo/render_routes.py --check  # exit 1 when it is stale

Every public operation of the app is forwarded to ``${env.BASE_URL}`` with the same path, and
documented in Zuplo's developer portal with the service's own summaries, parameters and
schemas. The probes (``/health*``) and ``/metrics`` are never routed: Render checks the probes on
the service directly, and metrics are on their own port. Each route runs the inbound policies of
config/policies.json in the order below. A test fails when the committed file differs from what
this script writes, so a new route cannot ship without its gateway route.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROUTES_FILE = HERE / "config" / "routes.oas.json"

# Never exposed through the gateway.
PRIVATE_PREFIXES = ("/health", "/metrics")
REF = re.compile(r'"\$ref": "#/components/(\w+)/([^"]+)"')
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# Cheapest refusal first; the key is checked before the rate limit so the limit is counted per
# consumer; the consumer headers are written after the client's were removed; the gateway
# secret is set last, overwriting whatever the client sent in its place.
INBOUND_POLICIES = [
    "request-size-limit",
    "api-key-auth",
    "rate-limit",
    "forward-consumer",
    "gateway-secret",
]


def service_openapi() -> dict[str, Any]:
    """The app's schema, built without a database or the caller's environment mattering."""
    from service import __version__
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(environment="test", version=__version__, sentry_dsn=None, log_level="ERROR")
    schema: dict[str, Any] = create_app(settings).openapi()
    return schema


def zuplo_route(operation: dict[str, Any]) -> dict[str, Any]:
    return {
        # How the route is named in Zuplo's route designer and logs.
        "label": operation.get("summary") or operation["operationId"],
        # No CORS at the gateway: the API's clients are programs. For browsers on another origin
        # set a Zuplo CORS policy here; preflights end at the gateway, never reach the service.
        "corsPolicy": "none",
        "handler": {
            "export": "urlForwardHandler",
            "module": "$import(@zuplo/runtime)",
            "options": {"baseUrl": "${env.BASE_URL}", "forwardSearch": True},
        },
        "policies": {"inbound": list(INBOUND_POLICIES)},
    }


def render(schema: dict[str, Any]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path, item in sorted(schema["paths"].items()):
        if path.startswith(PRIVATE_PREFIXES):
            continue
        routed: dict[str, Any] = {"x-zuplo-path": {"pathMode": "open-api"}}
        for method in HTTP_METHODS:
            if method in item:
                operation = item[method]
                routed[method] = {**operation, "x-zuplo-route": zuplo_route(operation)}
        paths[path] = routed
    used_tags = {
        tag
        for item in paths.values()
        for operation in item.values()
        for tag in operation.get("tags", [])
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": schema["info"]["title"],
            "version": schema["info"]["version"],
            "description": schema["info"].get("description", ""),
        },
        "tags": [tag for tag in schema.get("tags", []) if tag["name"] in used_tags],
        "paths": paths,
        "components": used_components(paths, schema.get("components", {})),
    }
    return document


def used_components(paths: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """The components the routed operations refer to, directly or through each other: the
    probes' models stay out of the portal with the probes."""
    used: dict[str, set[str]] = {
        "securitySchemes": {
            name
            for item in paths.values()
            for operation in item.values()
            for requirement in operation.get("security", [])
            for name in requirement
        }
    }
    pending = [paths]
    while pending:
        for ref in REF.findall(json.dumps(pending.pop())):
            kind, name = ref
            if name not in used.setdefault(kind, set()):
                used[kind].add(name)
                pending.append(components[kind][name])
    return {
        kind: {
            name: definition
            for name, definition in entries.items()
            if name in used.get(kind, set())
        }
        for kind, entries in components.items()
        if used.get(kind)
    }


def dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def expected_text() -> str:
    return dumps(render(service_openapi()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--out", type=Path, default=ROUTES_FILE)
    args = parser.parse_args(argv)
    text = expected_text()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run `make zuplo-routes`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(json.loads(text)['paths'])} paths)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
