"""Redis (the shared rate-limit counters) goes away under load: the API does not notice.

Rate limiting stays on, backed by the stack's Redis, with budgets the traffic never reaches.
While Redis is down the limiter fails open (requests pass unlimited), every answer stays a
2xx, answers stay fast, and ``rate_limit_backend_errors_total`` on the instances' metrics ports
counts the failures. When Redis is back the counters land in Redis again and the error counter
stops moving.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from traffic import Tenant, Traffic, summary

from testkit import require_binary, wait_until
from tools.stack import Stack

pytestmark = pytest.mark.stack

ANSWER_WITHIN_S = 1.0


def backend_errors(stack: Stack) -> float:
    """``rate_limit_backend_errors_total`` summed over every instance's metrics port."""
    total = 0.0
    for instance in stack.instances:
        text = httpx.get(instance.metrics_url, timeout=5).text
        for family in text_string_to_metric_families(text):
            if family.name == "rate_limit_backend_errors":
                total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def redis_keys(port: int) -> int:
    """DBSIZE over a raw RESP socket (no client library needed for one command)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"*1\r\n$6\r\nDBSIZE\r\n")
        reply = sock.recv(64)
    assert reply.startswith(b":"), reply
    return int(reply[1:].split(b"\r\n")[0])


def test_redis_down_rate_limiting_fails_open_and_is_counted(stack: Stack, tenant: Tenant) -> None:
    require_binary("redis-server")
    assert stack.uses_redis
    with Traffic(stack.url, tenant.key, clients=3, retries=0, pause=0.02) as traffic:
        traffic.wait_for(30)
        # The limiter really counts in Redis (flushed state would show 0 keys).
        assert redis_keys(stack.redis_port) > 0
        errors_before = backend_errors(stack)

        stack.stop_redis()
        down_at = time.monotonic()
        traffic.wait_for(150)
        errors_during = backend_errors(stack)
        stack.start_redis()
        up_at = time.monotonic()

        # Redis restarts empty (no persistence here): keys reappear once the breakers close.
        wait_until(lambda: redis_keys(stack.redis_port) > 0, timeout=15, what="counters in Redis")
        traffic.wait_for(60)
        errors_after = backend_errors(stack)

    calls = traffic.calls
    failed = [call for call in calls if not call.ok]
    assert not failed, summary(failed)
    during = [call for call in calls if down_at <= call.started < up_at]
    assert len(during) >= 150
    slow = [call for call in during if call.elapsed > ANSWER_WITHIN_S]
    assert not slow, [str(call) for call in slow[:10]]
    # Counted (the breaker allows one failed attempt per worker per BREAKER_SECONDS). That it
    # stops counting afterwards is shown by the counters reappearing in Redis above; the error
    # counter is not compared, as a CPU-starved test machine can push one Redis call past the
    # limiter's 0.25 s deadline at any time.
    assert errors_during > errors_before, (errors_before, errors_during)
    worst = max(call.elapsed for call in during)
    print(
        f"\nRedis outage: {len(during)} requests while down, all 2xx, slowest "
        f"{worst * 1000:.0f} ms; rate_limit_backend_errors_total {errors_before:g} -> "
        f"{errors_during:g} (down) -> {errors_after:g} (after)"
    )
