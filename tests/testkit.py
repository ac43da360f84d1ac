"""Helpers shared by the test suites: real-process plumbing, polling, tool requirements."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_binary(name: str, *, path: str | None = None) -> str:
    """The path of a required tool. Missing: skip with the reason here, fail in CI."""
    found = path if path and os.path.exists(path) else shutil.which(name)
    if not found:
        for candidate in (f"/usr/sbin/{name}", f"/usr/bin/{name}"):
            if os.path.exists(candidate):
                found = candidate
                break
    if not found:
        message = f"{name} is not installed (.ci/run installs it with apt-get)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    condition: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except Exception as exc:  # the thing is not up yet
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or condition}: {last_error}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def fuzz_settings(max_examples: int) -> Any:
    """Hypothesis settings for schemathesis runs: a fixed budget, reproducible, no deadline
    (a real server's latency is not the property under test), no example database on disk."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )


def load_module(path: Path, name: str) -> ModuleType:
    """A script or a conftest that is not importable as a package, loaded (anew) by path."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module
