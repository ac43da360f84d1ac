"""Faults beyond loopback, on separate hosts: expected behaviour first, then the proof.

Each scenario holds one fault under steady load from the client host (through nginx; clients
never retry) and prints its figures; docs/reliability.md quotes them. The bounds are the
shipped defaults (Settings, pgbouncer/pgbouncer.ini, nginx/render.py):

- ``ANSWER_WITHIN_S``: the longest the app takes to answer anything while its database is
  unreachable: pool checkout (SQLALCHEMY_POOL_TIMEOUT 5 s) + a statement
  (DATABASE_STATEMENT_TIMEOUT_MS 5 s + the 1 s client backstop) + the bounded rollback
  (DATABASE_CONNECT_TIMEOUT 3 s) = 14 s, plus 3 s for a busy 2-core runner.
- ``RECOVER_WITHIN_S``: from the link healing to the first 2xx.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from faults import FaultResult, measure_fault
from lab import FailureLab

from testkit import wait_until

pytestmark = pytest.mark.lab

HOLD_S = 30.0
ANSWER_WITHIN_S = 14.0 + 3.0
# nginx's PROXY_READ_TIMEOUT (20 s) + slack: nothing waits longer than this, ever.
NGINX_GIVES_UP_S = 20.0 + 2.0
# The known gap (docs/reliability.md): the app has no per-request deadline, so a request that
# meets two database timeouts in a row (the API-key lookup's, then its own) can outlast nginx's
# read timeout and get nginx's 504. Seen 0-3 times per 30 s scenario; more means a regression.
MAX_GATEWAY_TIMEOUTS = 3
RECOVER_WITHIN_S = 10.0
SETTLE_S = 10.0  # after healing, everything answers 2xx again from here on
IDLE_IN_TRANSACTION_S = 10.0  # ROLE_SETTINGS in tests/lab/lab.py


def report(result: FaultResult) -> None:
    print("\n" + result.figures())


def timeline(result: FaultResult) -> str:
    buckets: dict[int, list] = {}
    for call in result.calls:
        buckets.setdefault(int((call.started - result.applied_at) // 2), []).append(call)
    lines = []
    for slot in sorted(buckets):
        counts: dict[str, int] = {}
        for c in buckets[slot]:
            counts[str(c.status)] = counts.get(str(c.status), 0) + 1
        slowest = max(c.elapsed for c in buckets[slot])
        lines.append(f"t={slot * 2:+4d}s {counts} slowest {slowest:.2f}s")
    return "\n".join(lines)


def assert_answered_within_bounds(
    result: FaultResult, max_gateway_timeouts: int = MAX_GATEWAY_TIMEOUTS
) -> None:
    """2xx or 503 problem+json within the app's bound; nginx's 504 for at most a few requests
    that met two timeouts in a row; nothing ever waits past nginx's read timeout."""
    calls = result.calls
    gateway = [c for c in calls if c.status == 504]
    wrong = [
        c for c in calls if not (c.ok or c.status == 504 or (c.status == 503 and c.problem_json))
    ]
    assert not wrong, [str(c) for c in wrong[:5]] + [timeline(result)]
    assert len(gateway) <= max_gateway_timeouts, timeline(result)
    assert all(c.elapsed <= NGINX_GIVES_UP_S for c in calls), timeline(result)
    beyond = [c for c in calls if c.elapsed > ANSWER_WITHIN_S]
    print(
        f"  {len(gateway)} x nginx 504, {len(beyond)} answers slower than the app's "
        f"{ANSWER_WITHIN_S:.0f} s bound"
    )


def assert_database_outage_promises(result: FaultResult) -> None:
    """Every request is answered: 2xx, or 503 problem+json with Retry-After, within the bound;
    readiness fails and liveness holds on both instances; recovery within the bound; nothing
    acknowledged is lost or doubled; no process was replaced."""
    during = result.during()
    assert all(c.status is not None for c in result.calls), timeline(result)
    assert_answered_within_bounds(result)
    assert sum(c.status == 503 for c in during) >= 3, timeline(result)
    unavailable = [c for c in during if c.status == 503]
    assert all(c.problem_json for c in unavailable)
    probes = [p for p in result.probes if p.at > result.applied_at + 3]
    assert probes
    assert all(p.status == 200 for p in probes if p.path == "/health/live")
    ready = [p for p in probes if p.path == "/health/ready" and p.at > result.applied_at + 8]
    assert ready
    assert all(p.status == 503 for p in ready), [(p.instance, p.status) for p in ready]
    assert result.first_ok_after_heal is not None
    assert result.first_ok_after_heal <= RECOVER_WITHIN_S, result.figures()
    settled = result.after(SETTLE_S)
    assert settled
    assert all(c.ok for c in settled), timeline(result)
    assert not result.missing_writes(), sorted(result.missing_writes())[:5]
    assert not result.duplicated_writes()
    assert result.pids_after == result.pids_before, "a worker was replaced"


def test_postgres_blackholed(healthy_lab: FailureLab) -> None:
    """PostgreSQL's host drops every packet for 30 s (no reset): PgBouncer's server
    connections and the app's statements hang until their timeouts, then 503 + Retry-After."""
    lab = healthy_lab
    result = measure_fault(
        lab,
        "PostgreSQL blackholed",
        apply=lambda: lab.net.isolate("postgres"),
        undo=lab.net.heal_all,
        hold=HOLD_S,
    )
    report(result)
    assert_database_outage_promises(result)


def test_pgbouncer_blackholed(healthy_lab: FailureLab) -> None:
    """PgBouncer's host drops every packet for 30 s: the app's pooled connections are
    half-open, new ones cannot connect; the same promises as for PostgreSQL."""
    lab = healthy_lab
    result = measure_fault(
        lab,
        "PgBouncer blackholed",
        apply=lambda: lab.net.isolate("pgbouncer"),
        undo=lab.net.heal_all,
        hold=HOLD_S,
    )
    report(result)
    assert_database_outage_promises(result)


def test_pgbouncer_host_dies_with_open_transactions(healthy_lab: FailureLab) -> None:
    """PgBouncer's host vanishes (cut off, its process killed: its resets never arrive) while
    a client holds a transaction open through it and writes are in flight, then a new PgBouncer
    comes up on the same address. PostgreSQL ends the orphaned transaction within
    idle_in_transaction_session_timeout (10 s); nothing acknowledged is lost or doubled."""
    lab = healthy_lab
    holder = lab.open_transaction_via_pgbouncer("lab-open-transaction")
    wait_until(
        lambda: (
            "idle in transaction"
            in lab.psql("SELECT state FROM pg_stat_activity WHERE state = 'idle in transaction'")
        ),
        timeout=20,
        what="the open transaction",
    )
    died: list[float] = []

    def die() -> None:
        lab.net.isolate("pgbouncer")
        assert lab.pgbouncer is not None
        os.killpg(lab.pgbouncer.pid, signal.SIGKILL)
        lab.pgbouncer.wait(10)
        holder.kill()
        died.append(time.monotonic())

    def come_back() -> None:
        lab.net.heal_all()
        lab.start_pgbouncer()

    result = measure_fault(lab, "PgBouncer host dies", apply=die, undo=come_back, hold=15.0)
    report(result)
    open_after = lab.psql(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
    ).strip()
    ended_within = time.monotonic() - died[0]
    print(f"  orphaned transactions left {ended_within:.0f} s after the host died: {open_after}")
    assert open_after == "0"
    assert_database_outage_promises(result)


def test_redis_blackholed(healthy_lab: FailureLab) -> None:
    """Redis's host drops every packet for 15 s. Rate limiting fails open as documented
    (service/security/rate_limit.py): requests are served unlimited, each Redis failure costs
    at most its 0.25 s timeout once per breaker period, nothing restarts, and the limiter uses
    Redis again once it is back."""
    lab = healthy_lab
    result = measure_fault(
        lab,
        "Redis blackholed",
        apply=lambda: lab.net.isolate("redis"),
        undo=lab.net.heal_all,
        hold=15.0,
    )
    report(result)
    failed = [c for c in result.calls if not c.ok]
    assert not failed, [str(c) for c in failed[:5]]
    slowest = max(c.elapsed for c in result.during())
    assert slowest < 3.0, timeline(result)
    assert result.pids_after == result.pids_before


def _nginx_log(lab: FailureLab) -> list[dict[str, object]]:
    path = lab.work / "logs" / "nginx-access.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_app_host_cut_off_from_nginx(healthy_lab: FailureLab) -> None:
    """app1's host stops answering nginx (packets dropped) for 30 s. nginx gives up on it
    (connect timeout 2 s for new connections, read timeout 20 s for requests already sent on a
    kept-alive one) and stops sending it requests for UPSTREAM_FAIL_TIMEOUT after 3 failures;
    idempotent requests are re-sent to app2 and all succeed; a POST already sent to app1 is
    never re-sent (504 at worst, never a duplicate)."""
    lab = healthy_lab
    before = len(_nginx_log(lab))
    result = measure_fault(
        lab,
        "app1 cut off from nginx",
        apply=lambda: lab.net.cut("nginx", "app1"),
        undo=lab.net.heal_all,
        hold=HOLD_S,
    )
    report(result)
    reads = [c for c in result.calls if c.kind in {"read", "list"}]
    assert all(c.ok for c in reads), [str(c) for c in reads if not c.ok][:5]
    writes = [c for c in result.calls if c.kind == "create"]
    assert all(c.ok or c.status == 504 for c in writes), [str(c) for c in writes if not c.ok]
    entries = _nginx_log(lab)[before:]
    posts = [e for e in entries if e["method"] == "POST"]
    # An address list ("a, b") means nginx re-sent the request: only allowed for POSTs that were
    # never sent (connect failed), which nginx logs with no upstream status from the first.
    resent = [e for e in posts if "," in str(e["upstream_addr"]) and e["status"] == 201]
    for entry in resent:
        first_status = str(entry["upstream_status"]).split(",")[0].strip()
        assert first_status in {"502", "504", "-"}, entry
    assert not result.missing_writes()
    assert not result.duplicated_writes()
    app1 = f"{lab.address('app1')}:8000"
    late = [e for e in entries if app1 in str(e["upstream_addr"]) and e["status"] not in (200, 201)]
    print(f"  nginx: {len(late)} answers involving app1 were not 2xx; {len(resent)} POSTs re-sent")


def test_slow_database(healthy_lab: FailureLab) -> None:
    """Every burst of bytes to and from PostgreSQL waits 0.5 s for 20 s, under more clients
    than the pools hold. Requests are answered within the bound (2xx or 503 from the pool
    checkout or statement timeout), worker memory stays bounded, and once the link is fast
    again there is no pile-up: everything after the settle time succeeds."""
    lab = healthy_lab
    proxy = lab.pg_proxy
    assert proxy is not None
    rss_before = _worker_rss_mb(lab)

    def slow() -> None:
        proxy.delay = 0.5

    def fast() -> None:
        proxy.delay = 0.0

    result = measure_fault(lab, "slow database", apply=slow, undo=fast, hold=20.0, clients=24)
    report(result)
    rss_after = _worker_rss_mb(lab)
    print(f"  worker RSS before {rss_before:.0f} MB, after {rss_after:.0f} MB")
    assert all(c.status is not None for c in result.calls)
    # Every round trip is 1 s slower here, so many more requests add up past nginx's read
    # timeout than in the outages (3 of 83 in the recorded run).
    assert_answered_within_bounds(result, max_gateway_timeouts=8)
    settled = result.after(SETTLE_S)
    assert settled
    assert all(c.ok for c in settled), timeline(result)
    assert rss_after - rss_before < 50, (rss_before, rss_after)
    assert not result.missing_writes()
    assert not result.duplicated_writes()


def test_half_open_connection(healthy_lab: FailureLab) -> None:
    """app1's link to PgBouncer goes silent (no FIN, no reset) for 20 s while app2's stays up.
    app1 detects it per request within the statement timeout (5 s + 1 s backstop; new
    connections within DATABASE_CONNECT_TIMEOUT 3 s) and answers 503; its readiness fails, so
    a load balancer would take it out; app2 stays ready."""
    lab = healthy_lab
    result = measure_fault(
        lab,
        "app1 <-> PgBouncer half-open",
        apply=lambda: lab.net.cut("app1", "pgbouncer"),
        undo=lab.net.heal_all,
        hold=20.0,
    )
    report(result)
    assert_answered_within_bounds(result)
    late = [p for p in result.probes if p.at > result.applied_at + 8 and p.path == "/health/ready"]
    assert all(p.status == 503 for p in late if p.instance == "app1")
    assert all(p.status == 200 for p in late if p.instance == "app2")
    assert not result.missing_writes()
    assert all(c.ok for c in result.after(SETTLE_S))


def _worker_rss_mb(lab: FailureLab) -> float:
    total = 0.0
    for pids in lab.worker_pids().values():
        for pid in pids:
            for line in open(f"/proc/{pid}/status").read().splitlines():  # noqa: SIM115
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
    return total
