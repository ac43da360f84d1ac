"""What the worst client input costs the event loop; prints a table.

Not a test (nothing is asserted): the figures for docs/security.md. One gunicorn worker (so the
probe and the attack share an event loop) on an embedded PostgreSQL. For each payload, a thread
polls ``GET /health/live`` on its own keep-alive connection while the main thread sends the
payload ``ROUNDS`` times; printed are the payload's wall time, the size of the answer, and the
probe's worst latency during the attack next to its worst latency at rest. Also printed: the
CPU time, in this process, of parsing (``json.loads``) and validating (``TaskCreate``) each
body, which is the part the body limit bounds.

    .venv/bin/python -m tools.bench.adversarial
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx

from tools.bench.run import create_key, migrated_postgres, serve, single_worker_env

ROUNDS = 5
T = TypeVar("T")
LIMIT = 1_048_576


@dataclass
class Payload:
    name: str
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)


def _fill(prefix: bytes, item: bytes, suffix: bytes) -> bytes:
    count = (LIMIT - len(prefix) - len(suffix)) // (len(item) + 1)
    return prefix + b",".join([item] * count) + suffix


def payloads() -> list[Payload]:
    json_type = {"Content-Type": "application/json"}
    unknown = (
        b"{"
        + b",".join(f'"k{n}":1'.encode() for n in range(LIMIT // 12))[: LIMIT - 20].rsplit(b",", 1)[
            0
        ]
        + b',"title":"x"}'
    )
    maximal_valid = json.dumps(
        {
            "title": "x" * 200,
            "description": "d" * 10_000,
            "status": "in_progress",
            "priority": "urgent",
            "due_at": "2030-01-31T17:00:00Z",
            "tags": [f"{n:02d}" + "t" * 30 for n in range(20)],
        }
    ).encode()
    return [
        Payload("valid maximal task (11 KB)", "POST", "/v1/tasks", maximal_valid, json_type),
        Payload("1 MiB of unknown fields", "POST", "/v1/tasks", unknown, json_type),
        Payload(
            "1 MiB of invalid tags",
            "POST",
            "/v1/tasks",
            _fill(b'{"title":"t","tags":[', b'""', b"]}"),
            json_type,
        ),
        Payload(
            "1 MiB of nested arrays",
            "POST",
            "/v1/tasks",
            b'{"title":' + b"[" * (LIMIT // 2 - 10) + b"]" * (LIMIT // 2 - 10) + b"}",
            json_type,
        ),
        Payload(
            "1 MiB of whitespace + valid JSON",
            "POST",
            "/v1/tasks",
            b" " * (LIMIT - 20) + b'{"title":"t"}',
            json_type,
        ),
        Payload(
            "UTF-16 JSON",
            "POST",
            "/v1/tasks",
            json.dumps({"title": "x" * 1000}).encode("utf-16"),
            json_type,
        ),
        Payload(
            "If-Match: 3,000 tags",
            "DELETE",
            f"/v1/tasks/{uuid.uuid4()}",
            headers={"If-Match": ",".join(f'"{n}"' for n in range(1, 3001))},
        ),
        Payload(
            "query string at 8 KiB",
            "GET",
            "/v1/tasks",
            params={"q": "x", "pad": "p" * 8000},
        ),
        Payload(
            "headers at 32 KiB",
            "GET",
            "/v1/tasks",
            headers={f"X-Pad-{n}": "p" * 1000 for n in range(31)},
        ),
    ]


class Probe(threading.Thread):
    """Polls /health/live; keeps every latency while ``recording`` is set."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.stop = threading.Event()
        self.latencies: list[float] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                client.get("/health/live")
                self.latencies.append(time.perf_counter() - started)
                time.sleep(0.002)


def probe_during(base: str, action: Callable[[], T]) -> tuple[list[float], T]:
    probe = Probe(base)
    probe.start()
    time.sleep(0.2)
    probe.latencies.clear()
    try:
        result = action()
    finally:
        probe.stop.set()
        probe.join()
    return probe.latencies, result


def attack(client: httpx.Client, payload: Payload) -> tuple[list[float], httpx.Response]:
    """Sends the payload ROUNDS times: (wall seconds of each, the last answer)."""
    walls: list[float] = []
    answer: httpx.Response | None = None
    for _ in range(ROUNDS):
        started = time.perf_counter()
        answer = client.request(
            payload.method,
            payload.path,
            content=payload.body or None,
            headers=payload.headers,
            params=payload.params,
        )
        walls.append(time.perf_counter() - started)
    assert answer is not None
    return walls, answer


def in_process_cpu(payload: Payload) -> float | None:
    """Milliseconds to parse and validate the body here: what the body limit bounds."""
    if not payload.body or payload.method != "POST":
        return None
    from pydantic import ValidationError

    from service.tasks.schemas import TaskCreate

    started = time.process_time()
    try:
        document = json.loads(payload.body)
        TaskCreate.model_validate(document)
    except (ValueError, RecursionError, ValidationError):
        pass
    return (time.process_time() - started) * 1000


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="fastapi-app-bench-adversarial-"))
    pg = migrated_postgres(work)
    try:
        env, port = single_worker_env(pg, work, LOG_LEVEL="WARNING")
        key = create_key(env, str(uuid.uuid4()))
        base = f"http://127.0.0.1:{port}"
        rows = []
        command = [sys.executable, "-m", "service", "serve"]
        with (
            serve(command, env, "/health/ready", port),
            httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=60) as client,
        ):
            client.get("/v1/tasks")  # warm the key cache and the pool
            rest, _ = probe_during(base, lambda: time.sleep(2))
            for payload in payloads():
                during, (walls, answer) = probe_during(base, partial(attack, client, payload))
                cpu = in_process_cpu(payload)
                sent = len(payload.body) + sum(len(k) + len(v) for k, v in payload.headers.items())
                rows.append(
                    (
                        payload.name,
                        sent,
                        answer.status_code,
                        len(answer.content),
                        statistics.median(walls) * 1000,
                        max(during) * 1000 if during else float("nan"),
                        f"{cpu:.1f}" if cpu is not None else "-",
                    )
                )
        header = (
            f"{'payload':<34} {'sent B':>9} {'status':>6} {'answer B':>9} "
            f"{'wall ms':>8} {'live max ms':>12} {'parse+validate ms':>18}"
        )
        print(f"\nadversarial bench: 1 worker, {ROUNDS} rounds per payload")
        print(
            f"/health/live at rest: max {max(rest) * 1000:.1f} ms, "
            f"median {statistics.median(rest) * 1000:.1f} ms over {len(rest)} probes\n"
        )
        print(header)
        print("-" * len(header))
        for name, sent, status, size, wall, live, cpu_text in rows:
            print(
                f"{name:<34} {sent:>9} {status:>6} {size:>9} {wall:>8.1f} {live:>12.1f} "
                f"{cpu_text:>18}"
            )
    finally:
        pg.stop(mode="immediate")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
