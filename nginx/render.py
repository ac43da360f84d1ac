#!/usr/bin/env python3
"""Render the fastapi-app nginx configuration into a self-contained directory.

    UPSTREAM_SERVERS="127.0.0.1:8001 127.0.0.1:8002" LISTEN_PORT=8080 \
        python nginx/render.py --out /tmp/nginx-run [--foreground]
    nginx -t -p /tmp/nginx-run -c /tmp/nginx-run/nginx.conf
    nginx    -p /tmp/nginx-run -c /tmp/nginx-run/nginx.conf

The output runs without root: pid file and temp buffers live in DIR/run, logs go to
stderr/stdout (or ACCESS_LOG). Templates (nginx/templates/*.conf.template) are filled from the
environment with the defaults below; a template with a ``# requires: A B`` line is rendered only
when all those variables are set (the TLS server). The same templates work unchanged with the
official nginx image's envsubst entrypoint (see the template headers). Standard library only.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent

DEFAULTS: dict[str, str] = {
    "UPSTREAM_SERVERS": "127.0.0.1:8000",
    "UPSTREAM_MAX_FAILS": "3",
    "UPSTREAM_FAIL_TIMEOUT": "10s",
    "UPSTREAM_KEEPALIVE": "32",
    "LISTEN_PORT": "8080",
    "SERVER_NAME": "_",
    "STATUS_LISTEN": "127.0.0.1:8081",
    "LIMIT_REQ_RATE": "20r/s",
    "LIMIT_REQ_BURST": "40",
    "CLIENT_MAX_BODY_SIZE": "1m",
    "PROXY_CONNECT_TIMEOUT": "2s",
    "PROXY_READ_TIMEOUT": "20s",
    "PROXY_SEND_TIMEOUT": "20s",
    "PROXY_NEXT_UPSTREAM_TRIES": "3",
    "PROXY_NEXT_UPSTREAM_TIMEOUT": "25s",
    "ACCESS_LOG": "/dev/stdout",
    "TLS_LISTEN_PORT": "8443",
    "HSTS_MAX_AGE": "63072000",
    # The app's metrics port: refused in UPSTREAM_SERVERS so metrics are never proxied.
    "APP_METRICS_PORT": "9000",
}

# Values are pasted into nginx syntax: allow only what these settings can legitimately contain.
_VALUE = re.compile(r"^[A-Za-z0-9_.:/\[\]*=@+-]+$")
_HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:]+\]|[A-Za-z0-9.-]+|unix:/[\w./-]+):?(\d+)?$")
_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
_REQUIRES = re.compile(r"^#\s*requires:\s*(.+)$", re.MULTILINE)
# Paths in nginx.conf that are rewritten from /tmp into the output directory.
_WRITABLE_PATHS = re.compile(
    r"^(\s*(?:pid|client_body_temp_path|proxy_temp_path|fastcgi_temp_path|uwsgi_temp_path"
    r"|scgi_temp_path)\s+)/tmp/([\w.-]+);",
    re.MULTILINE,
)
WRITABLE_DIRECTIVES = 6


class RenderError(ValueError):
    """A variable is missing or has a value that cannot be pasted into nginx.conf safely."""


def upstream_directives(value: str, max_fails: str, fail_timeout: str, metrics_port: str) -> str:
    """``"a:8000 b:8000"`` (spaces or commas) -> ``server`` lines with passive health checks.

    A value that already contains ``server`` directives (the official-image form) is kept.
    """
    if "server " in value:
        directives = [part.strip() for part in value.split(";") if part.strip()]
        for directive in directives:
            words = directive.split()
            if words[0] != "server" or not all(_VALUE.match(word) for word in words[1:]):
                raise RenderError(f"UPSTREAM_SERVERS: {directive!r} is not a server directive")
        return "\n    ".join(f"{directive};" for directive in directives)
    entries = [item for item in re.split(r"[\s,]+", value) if item]
    if not entries:
        raise RenderError("UPSTREAM_SERVERS is empty")
    lines = []
    for entry in entries:
        match = _HOST_PORT.match(entry)
        if not match:
            raise RenderError(f"UPSTREAM_SERVERS: {entry!r} is not host:port")
        if match.group(1) == metrics_port:
            raise RenderError(
                f"UPSTREAM_SERVERS: {entry!r} is the metrics port; proxy the API port only"
            )
        lines.append(f"server {entry} max_fails={max_fails} fail_timeout={fail_timeout};")
    return "\n    ".join(lines)


def settings_from(environ: Mapping[str, str]) -> dict[str, str]:
    values = dict(DEFAULTS)
    names = set(DEFAULTS) | {"TLS_CERTIFICATE", "TLS_CERTIFICATE_KEY"}
    for name in names:
        if environ.get(name):
            values[name] = environ[name].strip()
    for name, value in values.items():
        if name != "UPSTREAM_SERVERS" and not _VALUE.match(value):
            raise RenderError(f"{name}={value!r} contains characters nginx.conf cannot take")
    values["UPSTREAM_SERVERS"] = upstream_directives(
        values["UPSTREAM_SERVERS"],
        values["UPSTREAM_MAX_FAILS"],
        values["UPSTREAM_FAIL_TIMEOUT"],
        values["APP_METRICS_PORT"],
    )
    return values


def substitute(template: str, values: Mapping[str, str], source: str) -> str:
    missing = sorted({name for name in _PLACEHOLDER.findall(template) if name not in values})
    if missing:
        raise RenderError(f"{source}: no value for {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def required_by(template: str) -> list[str]:
    match = _REQUIRES.search(template)
    return match.group(1).split() if match else []


def render_main(text: str, out: Path, *, foreground: bool) -> str:
    run_dir = out / "run"
    rendered, count = _WRITABLE_PATHS.subn(lambda m: f"{m.group(1)}{run_dir / m.group(2)};", text)
    if count != WRITABLE_DIRECTIVES:
        raise RenderError(
            f"nginx.conf: expected {WRITABLE_DIRECTIVES} /tmp paths (pid, temp paths), "
            f"found {count}"
        )
    if foreground:
        rendered = "daemon off;\n" + rendered
    return rendered


def render(
    out: Path,
    environ: Mapping[str, str] | None = None,
    *,
    foreground: bool = False,
) -> list[Path]:
    """Write nginx.conf, conf.d/ and snippets/ into ``out``; returns the files written."""
    values = settings_from(os.environ if environ is None else environ)
    out = out.resolve()
    for sub in ("conf.d", "snippets", "run", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for stale in (out / "conf.d").glob("*.conf"):
        stale.unlink()
    written = []
    main = out / "nginx.conf"
    main.write_text(render_main((HERE / "nginx.conf").read_text(), out, foreground=foreground))
    written.append(main)
    for template in sorted((HERE / "templates").glob("*.conf.template")):
        text = template.read_text()
        if not all(values.get(name) for name in required_by(text)):
            continue
        target = out / "conf.d" / template.name.removesuffix(".template")
        target.write_text(substitute(text, values, template.name))
        written.append(target)
    for snippet in sorted((HERE / "snippets").glob("*.conf")):
        target = out / "snippets" / snippet.name
        shutil.copyfile(snippet, target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory to write into")
    parser.add_argument(
        "--foreground", action="store_true", help="add `daemon off;` (process supervisors, tests)"
    )
    args = parser.parse_args(argv)
    try:
        files = render(args.out, foreground=args.foreground)
    except RenderError as error:
        print(f"render.py: {error}", file=sys.stderr)
        return 2
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
