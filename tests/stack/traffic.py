"""A steady stream of mixed API requests from client threads, every outcome recorded.

Each client loop creates a task (``POST /v1/tasks`` with a fresh ``Idempotency-Key`` and a
unique title), reads it back, and lists a page, until stopped. Threads with blocking httpx
clients, so the test thread stays free to restart processes while the traffic flows.

Retry policy (what a well-behaved client does, RFC 9110 §9.2.2): a request that got *no
response at all* (connection refused/reset/closed, timeout) may be re-sent when that is safe:
always for GET, and for POST only because it carries the same ``Idempotency-Key``, which makes
the server answer a repeat with the stored response instead of creating a second task. An HTTP
response (any status) is never retried: it is the outcome.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from service.security.principal import owner_id_from


@dataclass
class Probe:
    """One health probe of one app instance, made while a fault was in place."""

    at: float
    instance: str
    path: str
    status: int | None
    elapsed: float


def probe_instances(instances: Iterable[Any], client: httpx.Client, probes: list[Probe]) -> None:
    """One round of liveness and readiness probes of every instance (``.name``, ``.url``)."""
    for instance in instances:
        for path in ("/health/live", "/health/ready"):
            started = time.monotonic()
            try:
                status: int | None = client.get(f"{instance.url}{path}").status_code
            except httpx.HTTPError:
                status = None
            probes.append(Probe(started, instance.name, path, status, time.monotonic() - started))


@dataclass(frozen=True)
class Tenant:
    """An owner with its own API key: tests isolate their data by owner."""

    name: str
    key: str

    @property
    def owner_id(self) -> uuid.UUID:
        return owner_id_from(self.name)

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key}


@dataclass
class Call:
    client: int
    kind: str  # create | read | list
    started: float  # time.monotonic()
    finished: float = 0.0
    status: int | None = None
    content_type: str = ""
    problem_type: str = ""  # a problem+json answer's "type"
    error: str | None = None  # the last transport error, when no response came at all
    attempts: int = 1
    title: str = ""
    task_id: str | None = None
    replayed: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    transport_errors: list[str] = field(default_factory=list)

    @property
    def elapsed(self) -> float:
        return self.finished - self.started

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def problem_json(self) -> bool:
        return self.content_type.startswith("application/problem+json")

    def __str__(self) -> str:
        outcome = self.status if self.status is not None else self.error
        return (
            f"{self.kind} client={self.client} -> {outcome} in {self.elapsed * 1000:.0f} ms "
            f"(attempts {self.attempts}, X-Request-ID {self.request_id})"
        )


class Traffic:
    """``with Traffic(url, key) as traffic: ...``; afterwards ``traffic.calls`` has everything."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        clients: int = 4,
        retries: int = 2,
        timeout: float = 5.0,
        pause: float = 0.005,
        tag: str | None = None,
    ) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.clients = clients
        self.retries = retries
        self.timeout = timeout
        self.pause = pause
        self.tag = tag or uuid.uuid4().hex[:8]
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._crashes: list[BaseException] = []

    # --- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> Traffic:
        for index in range(self.clients):
            thread = threading.Thread(target=self._guarded, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout * (self.retries + 2))
        if self._crashes:
            raise self._crashes[0]

    # --- queries --------------------------------------------------------------------------------
    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def between(self, start: float, end: float) -> list[Call]:
        """Calls that started in [start, end)."""
        return [call for call in self.snapshot() if start <= call.started < end]

    def acknowledged_titles(self) -> set[str]:
        return {c.title for c in self.snapshot() if c.kind == "create" and c.status == 201}

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        """Block until at least ``count`` more calls have finished."""
        target = len(self.snapshot()) + count
        deadline = time.monotonic() + timeout
        while len(self.snapshot()) < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"traffic stalled below {target} calls")
            if self._crashes:
                raise self._crashes[0]
            time.sleep(0.02)

    # --- the client loops -----------------------------------------------------------------------
    def _guarded(self, index: int) -> None:
        try:
            self._loop(index)
        except BaseException as exc:  # surfaced by stop()
            self._crashes.append(exc)

    def _loop(self, index: int) -> None:
        headers = {"X-API-Key": self.api_key}
        with httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout) as http:
            sequence = 0
            while not self._stop.is_set():
                sequence += 1
                title = f"{self.tag}-{index}-{sequence}"
                key = str(uuid.uuid4())
                created = self._request(
                    http,
                    Call(index, "create", time.monotonic(), title=title),
                    lambda call, title=title, key=key: http.post(  # type: ignore[misc]
                        "/v1/tasks",
                        json={"title": title},
                        headers={"Idempotency-Key": key, "X-Request-ID": call.request_id},
                    ),
                )
                if created.status == 201 and created.task_id:
                    task_id = created.task_id
                    self._request(
                        http,
                        Call(index, "read", time.monotonic(), title=title, task_id=task_id),
                        lambda call, task_id=task_id: http.get(  # type: ignore[misc]
                            f"/v1/tasks/{task_id}", headers={"X-Request-ID": call.request_id}
                        ),
                    )
                self._request(
                    http,
                    Call(index, "list", time.monotonic()),
                    lambda call: http.get(
                        "/v1/tasks",
                        params={"limit": 20},
                        headers={"X-Request-ID": call.request_id},
                    ),
                )
                if self.pause:
                    self._stop.wait(self.pause)

    def _request(
        self, http: httpx.Client, call: Call, send: Callable[[Call], httpx.Response]
    ) -> Call:
        for attempt in range(1, self.retries + 2):
            call.attempts = attempt
            try:
                response = send(call)
            except httpx.TransportError as exc:  # no response at all: safe to re-send (see top)
                call.error = f"{type(exc).__name__}: {exc}"
                call.transport_errors.append(call.error)
                continue
            call.error = None
            call.status = response.status_code
            call.content_type = response.headers.get("content-type", "")
            call.replayed = response.headers.get("idempotent-replayed") == "true"
            if call.problem_json:
                with contextlib.suppress(ValueError, AttributeError):
                    call.problem_type = str(response.json().get("type", ""))
            if call.kind == "create" and response.status_code == 201:
                body: Any = None
                with contextlib.suppress(ValueError):
                    body = response.json()
                call.task_id = body.get("id") if isinstance(body, dict) else None
            break
        call.finished = time.monotonic()
        with self._lock:
            self.calls.append(call)
        return call


def summary(calls: list[Call]) -> str:
    """``status -> count`` over calls, for assertion messages and the report."""
    counts: dict[str, int] = {}
    for call in calls:
        label = str(call.status) if call.status is not None else f"no response ({call.error})"
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{label}: {count}" for label, count in sorted(counts.items()))
