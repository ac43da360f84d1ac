"""``make run`` (``python -m service dev``) from nothing: embedded PostgreSQL, migrations, a dev
key printed once, the README's curl walk-through, Ctrl-C, and a second run that keeps both. And
the other path the README promises: ``DATABASE_URL`` set, no embedded database, on a fresh clone.

Runs in an empty working directory, so ``.data/`` is created there exactly as on a fresh clone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit import free_port, wait_until
from tools.kit import REPO

pytestmark = pytest.mark.stack


@dataclass
class DevServer:
    process: subprocess.Popen[bytes]
    output: Path
    url: str
    metrics_url: str

    def text(self) -> str:
        return self.output.read_text(errors="replace")


@contextlib.contextmanager
def make_run(workdir: Path, extra_env: dict[str, str] | None = None) -> Iterator[DevServer]:
    port, metrics_port = free_port(), free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "PROMETHEUS_", "GATEWAY_", "REDIS_", "JWT_"))
    }
    env |= {
        "ENVIRONMENT": "development",
        "PORT": str(port),
        "METRICS_PORT": str(metrics_port),
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
    }
    env |= extra_env or {}
    output = workdir / f"dev-{uuid.uuid4().hex[:6]}.log"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "dev"],
            cwd=workdir,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = DevServer(
        process, output, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    )
    try:
        wait_until(
            lambda: httpx.get(server.url + "/health/ready", timeout=2).status_code == 200,
            timeout=90,
            interval=0.2,
            what=f"make run serving\n{server.text()[-2000:] if output.exists() else ''}",
        )
        yield server
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def stop_with_ctrl_c(server: DevServer) -> int:
    server.process.send_signal(signal.SIGINT)
    return server.process.wait(timeout=30)


def walk_through(base: str, key: str) -> str:
    """The README's curl walk-through; returns the id of a task it leaves in place."""
    headers = {"X-API-Key": key}
    with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
        created = client.post(
            "/v1/tasks",
            json={"title": "Write the runbook", "priority": "high", "tags": ["ops"]},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
        assert created.status_code == 201, created.text
        assert created.headers["location"] == f"/v1/tasks/{created.json()['id']}"
        listed = client.get("/v1/tasks", params={"limit": 20, "sort": "-created_at", "tag": "ops"})
        assert [item["id"] for item in listed.json()["items"]] == [created.json()["id"]]
        path = created.headers["location"]
        etag = client.get(path).headers["etag"]
        patched = client.patch(
            path,
            content=b'{"status": "in_progress", "description": null}',
            headers={"Content-Type": "application/merge-patch+json", "If-Match": etag},
        )
        assert patched.status_code == 200, patched.text
        assert patched.json()["status"] == "in_progress"
        assert client.delete(path).status_code == 204
        assert client.get(path).status_code == 404
        kept = client.post("/v1/tasks", json={"title": "kept across runs"})
        assert kept.status_code == 201
        return str(kept.json()["id"])


def test_make_run_from_nothing_then_again(tmp_path: Path) -> None:
    # Not tmp_path itself: pytest keeps it 0700, and the embedded PostgreSQL runs as an
    # unprivileged user when the tests run as root.
    workdir = Path(tempfile.mkdtemp(prefix="fastapi-app-make-run-"))
    try:
        with make_run(workdir) as first:
            key = (workdir / ".data" / "dev-api-key").read_text().strip()
            printed = first.text()
            assert "starting the embedded PostgreSQL in .data/postgres" in printed
            assert re.search(
                r"API key \(shown once, kept in \.data/dev-api-key\):\n\s+fa_", printed
            )
            assert key in printed, "the new key is printed once"
            assert (workdir / ".data" / "dev-api-key").stat().st_mode & 0o077 == 0
            assert httpx.get(first.url + "/docs", timeout=5).status_code == 200
            kept = walk_through(first.url, key)
            metrics = httpx.get(first.metrics_url, timeout=5).text
            assert 'http_requests_total{method="POST",route="/v1/tasks",status_code="201"}' in (
                metrics
            )
            assert stop_with_ctrl_c(first) == 0
            assert "embedded PostgreSQL stopped" in first.text()
            assert "Traceback" not in first.text()

        with make_run(workdir) as second:
            printed = second.text()
            assert key not in printed, "a stored key is not printed again"
            assert "API key:  export API_KEY=$(cat .data/dev-api-key)" in printed
            again = httpx.get(f"{second.url}/v1/tasks/{kept}", headers={"X-API-Key": key})
            assert again.status_code == 200, "the data and the key survive a restart"
            assert stop_with_ctrl_c(second) == 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def test_make_run_with_database_url_on_a_fresh_clone(postgres: Any) -> None:
    # Issue 9, finding 11: with DATABASE_URL set nothing created .data/, and writing the dev key
    # there crashed after the migration.
    url = await postgres.create_database("makerun")
    workdir = Path(tempfile.mkdtemp(prefix="fastapi-app-make-run-url-"))
    try:
        assert not (workdir / ".data").exists()
        with make_run(workdir, {"DATABASE_URL": url}) as server:
            printed = server.text()
            assert "embedded PostgreSQL" not in printed
            key_file = workdir / ".data" / "dev-api-key"
            key = key_file.read_text().strip()
            assert key in printed
            assert key_file.stat().st_mode & 0o077 == 0
            walk_through(server.url, key)
            assert stop_with_ctrl_c(server) == 0
            assert "Traceback" not in server.text()
        assert not (workdir / ".data" / "postgres").exists(), "no embedded database was made"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
