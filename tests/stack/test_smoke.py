"""``python -m service smoke``, the post-deploy check, against the running stack.

It is what ``helm test`` and the deploy workflow run after a rollout, so it must pass on a
healthy deployment and fail, with a non-zero exit and one clear line naming the failed step,
on a broken one.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from traffic import Tenant

from testkit import free_port
from tools.kit import REPO
from tools.stack import Stack

pytestmark = pytest.mark.stack


def smoke(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "smoke", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_smoke_passes_on_the_stack_and_leaves_nothing_behind(stack: Stack, tenant: Tenant) -> None:
    metrics = stack.instances[0].metrics_url
    result = smoke("--url", stack.url, "--api-key", tenant.key, "--metrics-url", metrics)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line.split(" (")[0] for line in result.stdout.splitlines() if line.startswith("ok")]
    assert steps[0] == "ok   GET /health/ready"
    assert steps[1] == "ok   POST /v1/tasks"
    assert any(step.endswith("after delete") for step in steps)
    assert steps[-1] == f"ok   GET {metrics}"
    assert result.stdout.rstrip().endswith("smoke passed")
    # It cleaned up its task.
    count = stack.psql(f"SELECT count(*) FROM tasks WHERE owner_id = '{tenant.owner_id}'")
    assert count.strip() == "0"


def test_smoke_fails_on_a_bad_key_naming_the_step(stack: Stack) -> None:
    result = smoke("--url", stack.url, "--api-key", "fa_aaaaaaaaaaaa_" + "b" * 43)
    assert result.returncode == 1
    assert "smoke FAILED: POST /v1/tasks: expected 201, got 401" in result.stderr
    assert "smoke passed" not in result.stdout


def test_smoke_fails_when_nothing_is_ready(tenant: Tenant) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = smoke("--url", url, "--api-key", tenant.key, "--ready-timeout", "2")
    assert result.returncode == 1
    assert "smoke FAILED: GET /health/ready: not ready after 2s (ConnectError)" in result.stderr
