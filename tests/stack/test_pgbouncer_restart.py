"""PgBouncer restarted under load: the same promises as a PostgreSQL outage (outage.py).

Stopped with SIGTERM, as Kubernetes stops its pod (PgBouncer 1.18: immediate shutdown, every
client connection dropped), down for 5 s, a new process on the same address. The app's pooled
connections all point at the dead process; they must be replaced without restarting anything.
"""

from __future__ import annotations

import signal

import pytest
from outage import assert_outage_promises, measure_outage, timeline
from traffic import Tenant

from tools.stack import Stack

pytestmark = pytest.mark.stack


def test_pgbouncer_restart_under_load(stack: Stack, tenant: Tenant) -> None:
    result = measure_outage(
        stack,
        tenant,
        stop=lambda: stack.stop_pgbouncer(signal.SIGTERM),
        start=stack.start_pgbouncer,
        down_for=5.0,
    )
    print(f"\nPgBouncer restart: {result.figures()}\n{timeline(result)}")
    assert_outage_promises(result)
