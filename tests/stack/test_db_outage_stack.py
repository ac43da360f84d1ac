"""PostgreSQL stops for 10 s under load, behind PgBouncer and Nginx (the whole stack).

The promises are in outage.py: 503 problem+json within 2 s during, probes honest, recovery
within 5 s of PostgreSQL accepting connections, no worker restarted, no acknowledged write lost.
"""

from __future__ import annotations

import pytest
from outage import assert_outage_promises, measure_outage, timeline
from traffic import Tenant

from tools.stack import Stack

pytestmark = pytest.mark.stack


def test_postgres_down_for_10s_under_load(stack: Stack, tenant: Tenant) -> None:
    result = measure_outage(
        stack,
        tenant,
        # fast: PostgreSQL terminates every session and exits, as in a crash or failover.
        stop=lambda: stack.stop_postgres(mode="fast"),
        start=stack.start_postgres,
        down_for=10.0,
    )
    print(f"\nPostgreSQL outage: {result.figures()}\n{timeline(result)}")
    assert_outage_promises(result)
