"""A real gunicorn (master + uvicorn workers) on free loopback ports, for the stack tests.

``python -m service serve`` by default (the image's command); a test can name another app
factory (tests/stack/slow_app.py) and then gunicorn runs with the same config file. Output goes
to files so a test can read everything the processes wrote. ``stop()`` always ends the master
and, if it leaves any behind, its workers, by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.entrypoints.server import GUNICORN_CONF
from service.settings import Settings
from testkit import free_port, port_open, wait_until

REPO = Path(__file__).resolve().parents[2]
# Every variable Settings reads: the test decides them all, nothing leaks in from the shell.
SETTINGS_VARS = {name.upper() for name in Settings.model_fields} | {"SECRETS_DIR"}


@dataclass
class Gunicorn:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    metrics_dir: Path
    stdout_path: Path
    stderr_path: Path
    known_workers: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace"
        )

    def log_records(self) -> list[dict[str, Any]]:
        """Every stdout line, parsed (a line that is not JSON fails the test)."""
        records = []
        for line in self.stdout_path.read_text().splitlines():
            if line.strip():
                records.append(json.loads(line))
        return records

    def workers(self) -> set[int]:
        """PIDs of the master's live children (the workers)."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            pids = {int(pid) for pid in path.read_text().split()}
        except OSError:
            return set()
        self.known_workers |= pids
        return pids

    def wait_workers(self, count: int, timeout: float = 20.0) -> set[int]:
        """Wait until ``count`` workers have finished their application startup."""

        def booted() -> set[int] | None:
            started = [r for r in self.log_records() if r.get("event") == "app_started"]
            workers = self.workers()
            return workers if len(started) >= count and len(workers) == count else None

        return wait_until(booted, timeout=timeout, what=f"{count} workers started")

    def scrape(self) -> str:
        response = httpx.get(self.metrics_url, timeout=5)
        response.raise_for_status()
        return response.text

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.workers()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for pid in self.known_workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def service_env(**settings: Any) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key.upper() not in SETTINGS_VARS}
    env.update({key.upper(): str(value) for key, value in settings.items()})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests" / "stack")])
    return env


@contextlib.contextmanager
def running_gunicorn(
    tmp_path: Path,
    *,
    database_url: str,
    app: str | None = None,
    workers: int = 2,
    wait_ready: bool = True,
    **settings: Any,
) -> Iterator[Gunicorn]:
    """Start gunicorn with these settings and stop it (by PID) whatever happens."""
    port, metrics_port = free_port(), free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    metrics_dir = tmp_path / "prometheus-multiproc"
    values: dict[str, Any] = {
        "environment": "test",
        "host": "127.0.0.1",
        "port": port,
        "metrics_port": metrics_port,
        "web_concurrency": workers,
        "prometheus_multiproc_dir": metrics_dir,
        "database_url": database_url,
        "rate_limit_enabled": "false",
        "log_level": "INFO",
        "gunicorn_graceful_timeout": 10,
    }
    values.update(settings)
    metrics_dir = Path(values["prometheus_multiproc_dir"])  # a caller's override included
    if app is None:
        command = [sys.executable, "-m", "service", "serve"]
    else:
        command = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), app]
    stdout_path, stderr_path = tmp_path / "gunicorn.out", tmp_path / "gunicorn.err"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command, cwd=REPO, env=service_env(**values), stdout=stdout, stderr=stderr
        )
    server = Gunicorn(process, port, metrics_port, metrics_dir, stdout_path, stderr_path)
    try:
        if wait_ready:
            wait_until(
                lambda: port_open(port) or process.poll() is not None,
                timeout=30,
                what="gunicorn listening",
            )
            assert process.poll() is None, server.output()
            server.wait_workers(workers)
        yield server
    finally:
        server.stop()


def wait_for_exit(process: subprocess.Popen[bytes], timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    code = process.wait(timeout=timeout)
    return code, time.monotonic() - started


async def poll(condition: Any, *, timeout: float, interval: float = 0.05, what: str = "") -> Any:
    """Async ``wait_until``: await ``condition()`` (sync or async) until truthy or fail."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
        except Exception as exc:
            last_error = exc
        await asyncio.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}: {last_error}")


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` in a scrape whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for item in family.samples:
            if item.name == name and all(item.labels.get(k) == v for k, v in labels.items()):
                total += item.value
    return total
