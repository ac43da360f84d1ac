"""The whole stack (tools/stack.py, ``make stack``) as fixtures for the reliability tests.

One stack per session: starting PostgreSQL, PgBouncer, Redis, two gunicorn instances and Nginx
costs seconds, and the tests put it back together afterwards (``Stack.heal``), so sharing it is
safe. It owns its own embedded PostgreSQL, never the session's shared ``postgres`` fixture:
the outage tests stop and start it.

Without nginx or pgbouncer installed the tests skip locally and fail under CI=true
(testkit.require_binary); .ci/run installs both.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from traffic import Tenant

from testkit import require_binary
from tools.stack import Stack

# All test traffic comes from 127.0.0.1, so the per-IP limits (Nginx's 20 r/s, the app's
# 300/minute) would turn a load test into a rate-limit test. Rate limiting stays ON, backed by
# Redis, with budgets the tests never reach; test_redis_outage relies on that.
STACK_APP_ENV = {
    "RATE_LIMIT_ENABLED": "true",
    "RATE_LIMIT_DEFAULT": "1000000/minute",
    "RATE_LIMIT_PER_IP": "1000000/minute",
    "LOG_LEVEL": "INFO",
}
STACK_NGINX_ENV = {"LIMIT_REQ_RATE": "100000r/s", "LIMIT_REQ_BURST": "100000"}
WORKERS_PER_INSTANCE = 2


def require_stack_binaries() -> None:
    require_binary("nginx")
    require_binary("pgbouncer")


@pytest.fixture(scope="session")
def stack_session() -> Iterator[Stack]:
    require_stack_binaries()
    # Its own temp dir, not pytest's: pytest keeps /tmp/pytest-of-<user> at mode 0700, which the
    # unprivileged user running PgBouncer and Nginx (when the tests run as root) cannot enter.
    with Stack(
        app_instances=2,
        workers=WORKERS_PER_INSTANCE,
        app_env=STACK_APP_ENV,
        nginx_env=STACK_NGINX_ENV,
        # Debian's PgBouncer 1.18 and pgbouncer-transaction mode, the configuration for a
        # PgBouncer that cannot track prepared statements; the chart's default (a PgBouncer that
        # can, pgbouncer-prepared) has its own stack in test_pgbouncer_prepared.py.
        pgbouncer_prepared=False,
    ) as stack:
        yield stack


@pytest.fixture
def stack(stack_session: Stack) -> Stack:
    """The shared stack, whole: anything an earlier test stopped is running again."""
    stack_session.heal()
    return stack_session


@pytest.fixture
def tenant(stack: Stack) -> Tenant:
    name = f"tenant-{uuid.uuid4().hex[:12]}"
    return Tenant(name, stack.create_api_key(name))
