"""Helpers shared by the test suites: real-process plumbing, polling, tool requirements."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

# Shared with the tools (tools/stack.py, tools/bench): defined there, imported from here by tests.
from tools.kit import free_port, load_module, port_open, wait_until

__all__ = [
    "IN_CI",
    "free_port",
    "fuzz_settings",
    "load_module",
    "port_open",
    "require_binary",
    "wait_until",
]

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
