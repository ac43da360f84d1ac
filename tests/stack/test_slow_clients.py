"""Slow and oversized clients through Nginx cost the app's workers nothing.

Nginx reads a request completely (headers within client_header_timeout, the body within
client_body_timeout, bodies over client_max_body_size refused) before it picks an instance, so
a slowloris-style crowd, clients trickling a body, and clients sending too much never hold a
gunicorn worker. While all three run at once, a normal authenticated request still answers
within 1 s, every time, and the instances never see the attackers' requests.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from traffic import Tenant

from tools.stack import Stack

pytestmark = pytest.mark.stack

ANSWER_WITHIN_S = 1.0
SLOW_HEADER_CLIENTS = 200
SLOW_BODY_CLIENTS = 50
ATTACK_SECONDS = 8.0
# In the path (the access log records paths, not query strings).
MARKER = "slowclient-marker"


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


class Crowd:
    """Threads that each keep one connection busy doing the wrong thing, until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.oversized: list[tuple[int, str]] = []  # (status, content type) nginx answered
        self.lock = threading.Lock()

    def _connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=2)

    def slow_headers(self) -> None:
        """Slowloris: a request line, then one header byte now and then, never the blank line."""
        with contextlib.suppress(OSError), self._connect() as sock:
            sock.sendall(f"GET /{MARKER} HTTP/1.1\r\nHost: localhost\r\n".encode())
            while not self.stop.wait(0.5):
                sock.sendall(b"X-a: b\r\n")

    def slow_body(self) -> None:
        """Announces 500 kB (within the limit), then trickles it a few bytes at a time."""
        with contextlib.suppress(OSError), self._connect() as sock:
            sock.sendall(
                f"POST /{MARKER} HTTP/1.1\r\nHost: localhost\r\n"
                "Content-Type: application/json\r\nContent-Length: 500000\r\n\r\n".encode()
            )
            while not self.stop.wait(0.5):
                sock.sendall(b"[[[[")

    def oversized_bodies(self) -> None:
        """2 MiB bodies, again and again: nginx must refuse them itself."""
        body = b"x" * (2 * 1024 * 1024)
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    response = client.post(
                        f"http://127.0.0.1:{self.port}/{MARKER}",
                        content=body,
                        headers={"Content-Type": "application/json"},
                    )
                    with self.lock:
                        self.oversized.append(
                            (response.status_code, response.headers.get("content-type", ""))
                        )

    @contextlib.contextmanager
    def running(self) -> Iterator[Crowd]:
        targets = (
            [self.slow_headers] * SLOW_HEADER_CLIENTS
            + [self.slow_body] * SLOW_BODY_CLIENTS
            + [self.oversized_bodies] * 2
        )
        self.threads = [threading.Thread(target=target, daemon=True) for target in targets]
        for thread in self.threads:
            thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            for thread in self.threads:
                thread.join(timeout=15)


def test_slow_and_oversized_clients_do_not_hold_app_workers(stack: Stack, tenant: Tenant) -> None:
    with httpx.Client(base_url=stack.url, headers=tenant.headers, timeout=10) as client:
        created = client.post("/v1/tasks", json={"title": "still here"})
        assert created.status_code == 201, created.text
        path = f"/v1/tasks/{created.json()['id']}"

        timings: list[float] = []
        failures: list[str] = []
        with Crowd(_port(stack.url)).running() as crowd:
            deadline = time.monotonic() + ATTACK_SECONDS
            while time.monotonic() < deadline:
                started = time.monotonic()
                # A new connection each time: a request that must get through the crowd.
                response = httpx.get(stack.url + path, headers=tenant.headers, timeout=10)
                timings.append(time.monotonic() - started)
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")
                time.sleep(0.05)
            alive = sum(thread.is_alive() for thread in crowd.threads)

    assert alive >= SLOW_HEADER_CLIENTS // 2, f"the crowd never formed ({alive} connections)"
    assert not failures, failures[:5]
    assert len(timings) >= 20
    slow = [round(t, 3) for t in timings if t > ANSWER_WITHIN_S]
    assert not slow, slow
    assert crowd.oversized, "no oversized body was answered"
    assert set(crowd.oversized) == {(413, "application/problem+json")}
    # Nginx held all of it: none of the attackers' requests reached an instance.
    for instance in stack.instances:
        assert instance.process is not None
        log = instance.process.log_path.read_text(errors="replace")
        assert MARKER not in log, f"{instance.name} saw an attacker's request"
    timings.sort()
    print(
        f"\nslow clients: {SLOW_HEADER_CLIENTS} slowloris + {SLOW_BODY_CLIENTS} slow bodies + "
        f"{len(crowd.oversized)} x 2 MiB (all 413); {len(timings)} normal requests, "
        f"p50 {timings[len(timings) // 2] * 1000:.0f} ms, max {timings[-1] * 1000:.0f} ms"
    )
