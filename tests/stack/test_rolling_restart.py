"""Rolling restart under load: zero failed requests, every acknowledged write exactly once.

Two app instances behind Nginx; four client loops send a steady mix of writes (each with its own
Idempotency-Key) and reads. Each instance in turn is restarted the way a rolling update does it:
taken out of Nginx's upstream (re-render + graceful reload, what service discovery does for
open-source Nginx), SIGTERM (gunicorn's graceful shutdown), a new process on the same port,
``/health/ready`` polled until 200, back into the upstream.
"""

from __future__ import annotations

import json

import pytest
from traffic import Tenant, Traffic, summary

from tools.stack import Stack

pytestmark = pytest.mark.stack


def served_by(stack: Stack, since_line: int) -> dict[str, int]:
    """Requests per upstream address in Nginx's JSON access log after ``since_line``."""
    counts: dict[str, int] = {}
    lines = (stack.logs_dir / "nginx-access.log").read_text().splitlines()[since_line:]
    for line in lines:
        record = json.loads(line)
        for address in record["upstream_addr"].split(", "):
            counts[address] = counts.get(address, 0) + 1
    return counts


def access_log_length(stack: Stack) -> int:
    path = stack.logs_dir / "nginx-access.log"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_rolling_restart_under_load_fails_no_request_and_loses_no_write(
    stack: Stack, tenant: Tenant
) -> None:
    old_masters = {instance.index: instance.master_pid for instance in stack.instances}
    log_start = access_log_length(stack)
    with Traffic(stack.url, tenant.key, clients=4) as traffic:
        traffic.wait_for(60)
        timings = []
        for instance in stack.instances:
            timings.append(stack.restart_instance(instance.index))
            # The replacement takes real traffic before the next instance goes.
            traffic.wait_for(60)
    calls = traffic.calls

    # Every instance really is a new process, and each one served requests.
    for instance in stack.instances:
        assert instance.master_pid != old_masters[instance.index]
        assert all(t.exit_code == 0 for t in timings), timings
    per_upstream = served_by(stack, log_start)
    for instance in stack.instances:
        assert per_upstream.get(instance.address, 0) > 20, per_upstream

    # Zero failed requests.
    failed = [call for call in calls if not call.ok]
    assert not failed, f"{len(failed)} of {len(calls)} failed: {summary(failed)}"
    writes = [call for call in calls if call.kind == "create"]
    assert len(writes) > 100, summary(calls)

    # Every write acknowledged with 201 exists exactly once; nothing else was written twice.
    rows = stack.psql(
        f"SELECT title, count(*) FROM tasks WHERE owner_id = '{tenant.owner_id}' GROUP BY title"
    ).splitlines()
    stored = dict(row.split("|") for row in rows)
    acknowledged = {call.title for call in writes if call.status == 201}
    assert acknowledged <= set(stored), acknowledged - set(stored)
    duplicated = {title: count for title, count in stored.items() if count != "1"}
    assert not duplicated, duplicated

    retried = [call for call in calls if call.attempts > 1]
    print(
        f"\nrolling restart: {len(calls)} requests ({len(writes)} writes), 0 failed, "
        f"{len(retried)} re-sent after a transport error "
        f"({', '.join(sorted({e for c in retried for e in c.transport_errors})) or 'none'}); "
        f"per instance {per_upstream}; "
        + "; ".join(
            f"restart {i}: drain {t.drained_s:.2f}s stop {t.stopped_s:.2f}s "
            f"ready {t.ready_s:.2f}s route {t.routed_s:.2f}s"
            for i, t in enumerate(timings)
        )
    )
