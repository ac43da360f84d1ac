"""The failure lab (tests/lab/lab.py) as a fixture, and the rules for when it cannot run.

Network namespaces need root (CAP_SYS_ADMIN) and the ``ip`` and ``iptables`` tools; .ci/run
installs both and CI runs as root. Elsewhere the lab skips with the reason; under CI=true it
fails instead (testkit.require_binary's rule).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stack"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab import FailureLab
from netlab import LabUnavailableError, probe_namespaces

from testkit import require_binary, skip_or_fail


def require_namespaces() -> None:
    for tool in ("ip", "iptables", "nginx", "pgbouncer", "redis-server"):
        require_binary(tool)
    try:
        with probe_namespaces():
            pass
    except LabUnavailableError as exc:
        skip_or_fail(f"network namespaces cannot be made here ({exc}); the lab needs root")


@pytest.fixture(scope="session")
def lab() -> Iterator[FailureLab]:
    require_namespaces()
    with FailureLab() as running:
        yield running


@pytest.fixture
def healthy_lab(lab: FailureLab) -> FailureLab:
    """The lab with every link healed and every instance ready (an earlier scenario's faults
    undone)."""
    lab.net.heal_all()
    assert lab.pg_proxy is not None
    lab.pg_proxy.delay = 0.0
    if lab.pgbouncer is None or lab.pgbouncer.poll() is not None:
        lab.start_pgbouncer()
    for instance in lab.instances:
        lab.wait_ready(instance)
    return lab
