"""``python -m service smoke``: the post-deploy check run by ``helm test`` and the deploy workflow.

It exercises what a release can break without any unit test noticing: the instance is ready,
credentials work end to end, a write is durable and readable, a delete sticks, and (when a
metrics URL is given) Prometheus can scrape. It stops at the first failure with one clear line
and a non-zero exit code; it cleans up the task it creates.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx


class SmokeFailedError(Exception):
    pass


@dataclass
class SmokeCheck:
    url: str
    api_key: str
    metrics_url: str | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)
    ready_timeout: float = 60.0
    request_timeout: float = 10.0
    say: Callable[[str], None] = print

    def _client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url.rstrip("/"),
            timeout=self.request_timeout,
            headers={"X-API-Key": self.api_key, **self.extra_headers},
        )

    def _expect(self, response: httpx.Response, status: int, step: str) -> httpx.Response:
        if response.status_code != status:
            detail = response.text[:300].replace("\n", " ")
            raise SmokeFailedError(
                f"{step}: expected {status}, got {response.status_code}: {detail}"
            )
        elapsed_ms = response.elapsed.total_seconds() * 1000
        self.say(f"ok   {step} ({response.status_code}, {elapsed_ms:.0f} ms)")
        return response

    def _wait_ready(self, client: httpx.Client) -> None:
        deadline = time.monotonic() + self.ready_timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                response = client.get("/health/ready")
                if response.status_code == 200:
                    self._expect(response, 200, "GET /health/ready")
                    return
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(1)
        raise SmokeFailedError(
            f"GET /health/ready: not ready after {self.ready_timeout:g}s ({last})"
        )

    def run(self) -> None:
        with self._client() as client:
            self._wait_ready(client)
            title = f"smoke {uuid.uuid4()}"
            created = self._expect(
                client.post(
                    "/v1/tasks",
                    json={"title": title, "tags": ["smoke"]},
                    headers={"Idempotency-Key": str(uuid.uuid4())},
                ),
                201,
                "POST /v1/tasks",
            ).json()
            task_path = f"/v1/tasks/{created['id']}"
            try:
                fetched = self._expect(client.get(task_path), 200, f"GET {task_path}").json()
                if fetched.get("title") != title:
                    raise SmokeFailedError(
                        f"GET {task_path}: title {fetched.get('title')!r} != {title!r}"
                    )
            finally:
                self._expect(client.delete(task_path), 204, f"DELETE {task_path}")
            self._expect(client.get(task_path), 404, f"GET {task_path} after delete")
        if self.metrics_url:
            response = httpx.get(self.metrics_url, timeout=self.request_timeout)
            self._expect(response, 200, f"GET {self.metrics_url}")
            if "http_requests_total" not in response.text:
                raise SmokeFailedError(f"{self.metrics_url}: no http_requests_total series")


def parse_headers(values: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for value in values:
        name, sep, content = value.partition(":")
        if not sep or not name.strip():
            raise SmokeFailedError(f"--header {value!r}: expected 'Name: value'")
        headers[name.strip()] = content.strip()
    return headers
