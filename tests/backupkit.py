"""Helpers of the backup, restore-drill and role tests: matching client tools, a Pushgateway."""

from __future__ import annotations

import glob
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg

from testkit import libpq_url, skip_or_fail


async def server_major(url: str) -> int:
    conn = await asyncpg.connect(libpq_url(url))
    try:
        return int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()


def _major_of(bin_dir: Path) -> int | None:
    tool = bin_dir / "pg_dump"
    if not tool.is_file():
        return None
    out = subprocess.run([str(tool), "--version"], capture_output=True, text=True, check=False)
    try:
        return int(out.stdout.split("(PostgreSQL)")[1].split(".")[0].split()[0])
    except (IndexError, ValueError):
        return None


def pg_bin_dir_for(major: int) -> Path:
    """A directory with pg_dump/pg_restore of ``major``: the embedded server's own tools, or a
    distribution's. Missing: skip with the reason here, fail in CI."""
    candidates: list[Path] = []
    try:
        from service.tools.embedded_postgres import binaries_dir

        candidates.append(binaries_dir())
    except RuntimeError:
        pass
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"))]
    found = next((candidate for candidate in candidates if _major_of(candidate) == major), None)
    if found is None:
        skip_or_fail(f"no pg_dump of PostgreSQL {major} (the test server's major version)")
    return found


@dataclass
class Pushgateway:
    """Records what a Pushgateway client sends: (method, path, body) per request."""

    url: str
    received: list[tuple[str, str, str]] = field(default_factory=list)

    def bodies(self, job: str) -> list[str]:
        return [body for _, path, body in self.received if f"/job/{job}/" in path]


@contextmanager
def pushgateway() -> Iterator[Pushgateway]:
    server_box: list[Pushgateway] = []

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode()
            server_box[0].received.append((self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        do_PUT = do_POST = _record  # noqa: N815 - http.server's naming

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    gateway = Pushgateway(f"http://127.0.0.1:{httpd.server_address[1]}")
    server_box.append(gateway)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield gateway
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
