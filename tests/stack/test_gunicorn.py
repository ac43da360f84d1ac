"""``python -m service serve``: a real gunicorn master with uvicorn workers, as in the image."""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from gunicorn_harness import REPO, Gunicorn, running_gunicorn, service_env, wait_for_exit

from testkit import wait_until

pytestmark = pytest.mark.stack


def test_serve_runs_gunicorn_with_uvicorn_workers_on_uvloop_and_httptools(
    tmp_path: Path, database_url: str
) -> None:
    with running_gunicorn(tmp_path, database_url=database_url, workers=2) as server:
        workers = server.workers()
        live = httpx.get(server.url + "/health/live")
        ready = httpx.get(server.url + "/health/ready")
        # The API port never serves metrics; the metrics port does.
        api_metrics = httpx.get(server.url + "/metrics")
        scrape = server.scrape()
        maps = {pid: Path(f"/proc/{pid}/maps").read_text() for pid in workers}
        records = server.log_records()

    assert len(workers) == 2
    assert live.status_code == 200
    assert ready.status_code == 200
    # No banner naming the server or its version.
    assert "server" not in live.headers
    assert api_metrics.status_code == 404
    assert api_metrics.headers["content-type"] == "application/problem+json"
    assert "http_requests_total" in scrape
    assert 'app_info{environment="test"' in scrape
    for worker_maps in maps.values():
        assert "uvloop" in worker_maps
        assert "httptools" in worker_maps
    # gunicorn's and uvicorn's own messages went through the JSON pipeline too.
    loggers = {record["logger"] for record in records}
    assert {"gunicorn.error", "uvicorn.error", "service.access", "service.app"} <= loggers
    assert any("service.entrypoints.worker.ServiceWorker" in r["event"] for r in records)
    assert not server.stderr_path.read_text().strip()


def access_ips(server: Gunicorn) -> list[str]:
    # The access line is written just after the response is sent: wait for it.
    return wait_until(
        lambda: [r["client_ip"] for r in server.log_records() if r["event"] == "request"],
        timeout=5,
        what="access log line",
    )


def test_client_ip_from_forwarded_for_only_behind_a_trusted_proxy(
    tmp_path: Path, database_url: str
) -> None:
    spoofed = {"X-Forwarded-For": "203.0.113.7"}
    with running_gunicorn(
        tmp_path / "trusted", database_url=database_url, workers=1, forwarded_allow_ips="127.0.0.1"
    ) as trusted:
        httpx.get(trusted.url + "/health/live", headers=spoofed)
        trusted_ips = access_ips(trusted)
    with running_gunicorn(
        tmp_path / "untrusted", database_url=database_url, workers=1, forwarded_allow_ips="10.9.9.9"
    ) as untrusted:
        httpx.get(untrusted.url + "/health/live", headers=spoofed)
        untrusted_ips = access_ips(untrusted)

    assert trusted_ips == ["203.0.113.7"]
    assert untrusted_ips == ["127.0.0.1"]


def test_a_blocked_worker_is_aborted_after_the_timeout_and_replaced(
    tmp_path: Path, database_url: str
) -> None:
    with running_gunicorn(
        tmp_path,
        database_url=database_url,
        app="slow_app:create_app_from_env()",
        workers=1,
        gunicorn_timeout=2,
    ) as server:
        (blocked,) = server.workers()
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url + "/_test/block", params={"seconds": 20}, timeout=15)
        replacement = wait_until(
            lambda: server.workers() - {blocked}, timeout=15, what="replacement worker"
        )
        records = server.log_records()
        assert httpx.get(server.url + "/health/live", timeout=10).status_code == 200

    assert blocked not in replacement
    aborted = [r for r in records if r["event"] == "worker_timeout_abort"]
    assert [r["pid"] for r in aborted] == [blocked]


def test_metrics_port_zero_disables_the_metrics_server(tmp_path: Path, database_url: str) -> None:
    with running_gunicorn(tmp_path, database_url=database_url, workers=1, metrics_port=0) as server:
        assert httpx.get(server.url + "/health/live").status_code == 200
        events = [r["event"] for r in server.log_records()]
    assert "metrics_disabled" in events
    assert "metrics_listening" not in events


def test_serve_refuses_a_bad_configuration_before_starting_gunicorn(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve"],
        cwd=REPO,
        env=service_env(port="not-a-port", prometheus_multiproc_dir=tmp_path / "m"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    code, _ = wait_for_exit(process, timeout=30)
    assert process.stderr is not None
    error = process.stderr.read().decode()
    assert code == 2
    assert error.strip().splitlines() == [error.strip()]
    assert "PORT" in error


def test_sigterm_during_boot_still_exits_cleanly(tmp_path: Path, database_url: str) -> None:
    with running_gunicorn(
        tmp_path, database_url=database_url, workers=1, wait_ready=False
    ) as server:
        wait_until(lambda: server.workers(), timeout=20, what="a worker forked")
        server.signal(signal.SIGTERM)
        code = server.wait(timeout=20)
    assert code == 0


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def upload_chunked(port: int, headers: dict[str, str], total: int) -> tuple[bytes, int]:
    """Stream ``total`` bytes as a chunked body until the server answers; (response, sent)."""
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = f"POST /v1/tasks HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n{head}\r\n"
    chunk = b"x" * 65536
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    opening = b'{"title": "'
    pending = request.encode() + b"%x\r\n%s\r\n" % (len(opening), opening)
    sent, response = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setblocking(False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and b"\r\n\r\n" not in response:
            if not pending and sent < total:
                pending = framed
            readable, writable, _ = select.select([sock], [sock] if pending else [], [], 1)
            if readable:
                data = sock.recv(65536)
                if not data:
                    break
                response += data
            elif writable:
                try:
                    written = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    pending = b""
                    sent = total
                    continue
                pending = pending[written:]
                sent += written
    return response, sent


async def test_a_50_mib_chunked_upload_is_refused_without_being_buffered(
    tmp_path: Path, database_url: str, make_credential: Any
) -> None:
    credential = await make_credential()
    total = 50 * 1024 * 1024
    with running_gunicorn(tmp_path, database_url=database_url, workers=1) as server:
        (worker,) = server.workers()
        before = rss_bytes(worker)
        response, sent = upload_chunked(
            server.port,
            {**credential.headers, "Content-Type": "application/json"},
            total,
        )
        grown = rss_bytes(worker) - before
        still_alive = httpx.get(server.url + "/health/live").status_code

    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"application/problem+json" in response
    # Refused long before the end: the server stopped reading at the 1 MiB limit (plus what the
    # socket buffers held), and the worker never held the body in memory.
    assert sent < total / 4
    assert grown < 20 * 1024 * 1024, grown
    assert still_alive == 200
