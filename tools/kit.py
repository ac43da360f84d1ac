"""Helpers the tools and the tests share: finding a binary, free loopback ports, polling with a
deadline, loading a script by path. Nothing here imports pytest; test-only helpers (a missing
binary skips a test, or fails it in CI) live in tests/testkit.py."""

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
from typing import Literal, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
# Daemons (nginx, pgbouncer, redis-server) install into sbin, which a non-root PATH often lacks.
_SYSTEM_DIRS = ("/usr/local/sbin", "/usr/sbin", "/usr/local/bin", "/usr/bin")


def find_binary(name: str) -> str | None:
    """The path of the executable ``name``, or None: this interpreter's own bin directory first
    (the tools ``uv sync`` installs into .venv: hadolint, shellcheck, py-spy, uv), then PATH,
    then the system directories PATH may lack."""
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.is_file() and os.access(venv_bin, os.X_OK):
        return str(venv_bin)
    found = shutil.which(name)
    if found:
        return found
    for directory in _SYSTEM_DIRS:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    condition: Callable[[], T | Literal[False] | None],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "",
) -> T:
    """Poll ``condition`` until it returns something truthy (that value), or fail after
    ``timeout``. ``None`` and ``False`` mean "not yet", so a condition may say so without
    inventing a truthy placeholder."""
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


def load_module(path: Path, name: str) -> ModuleType:
    """A script or a conftest that is not importable as a package, loaded (anew) by path."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module
