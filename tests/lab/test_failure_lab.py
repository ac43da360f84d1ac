"""Faults beyond loopback, on separate hosts: expected behaviour first, then the proof.

Each scenario holds one fault under steady load from the client host (through nginx; clients
never retry) and prints its figures; docs/reliability.md quotes them. The bounds are the
shipped defaults (Settings, pgbouncer/pgbouncer.ini, nginx/render.py):

- ``ANSWER_WITHIN_S``: the longest the app takes to answer anything: its request deadline
  (REQUEST_TIMEOUT_SECONDS 15 s) + the clean-up of the cancelled request's connection (at most
  2 s) + 1 s for a busy 2-core runner = 18 s, below nginx's read timeout (20 s). So nginx never
  answers for the app: no bare 504, ever. The longest single database failure (checkout 5 s +
  statement 6 s + rollback 3 s = 14 s) stays under the deadline, so it keeps its own answer.
- ``RECOVER_WITHIN_S``: from the link healing to the first 2xx.
- ``DEAD_PEER_S``: a silent peer (no FIN, no reset) found on an open socket by TCP keepalive
  (DATABASE_TCP_KEEPALIVE_IDLE/INTERVAL/COUNT: 5 + 2 x 3 = 11 s).
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from faults import FaultResult, measure_fault
from lab import PGB_PORT, FailureLab

from testkit import wait_until

pytestmark = pytest.mark.lab

HOLD_S = 30.0
ANSWER_WITHIN_S = 15.0 + 2.0 + 1.0
DEAD_PEER_S = 5 + 2 * 3
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


def assert_answered_within_bounds(result: FaultResult) -> None:
    """2xx, or the app's own problem+json within its deadline: 503 (nothing applied), or for a
    write whose COMMIT got no answer 504 ``commit-outcome-unknown``. Never nginx's bare 504."""
    calls = result.calls
    gateway = [c for c in calls if c.status == 504 and not c.problem_json]
    unknown = [c for c in calls if c.status == 504 and c.problem_json]
    wrong = [c for c in calls if not (c.ok or (c.status == 503 and c.problem_json) or c in unknown)]
    assert not gateway, [str(c) for c in gateway[:5]] + [timeline(result)]
    assert not wrong, [str(c) for c in wrong[:5]] + [timeline(result)]
    assert all(c.kind == "create" for c in unknown), [str(c) for c in unknown]
    slowest = max(c.elapsed for c in calls)
    assert slowest <= ANSWER_WITHIN_S, timeline(result)
    print(
        f"  0 x nginx 504; {len(unknown)} x 504 commit-outcome-unknown (writes); slowest answer "
        f"{slowest:.1f} s (bound {ANSWER_WITHIN_S:.0f} s)"
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

    orphan_ended: list[float] = []
    orphans = "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"

    def watch(applied_at: float) -> None:
        # Polled against a deadline: the role's timeout plus slack, inside the 15 s hold.
        while time.monotonic() < died[0] + IDLE_IN_TRANSACTION_S + 4:
            if lab.psql(orphans).strip() == "0":
                orphan_ended.append(time.monotonic() - died[0])
                return
            time.sleep(0.25)

    result = measure_fault(
        lab, "PgBouncer host dies", apply=die, undo=come_back, hold=15.0, during=watch
    )
    report(result)
    open_after = lab.psql(orphans).strip()
    ended = f"{orphan_ended[0]:.1f} s" if orphan_ended else "not within the bound"
    print(
        f"  the orphaned transaction ended {ended} after the host died "
        f"(idle_in_transaction_session_timeout {IDLE_IN_TRANSACTION_S:.0f} s); "
        f"open at the end: {open_after}"
    )
    assert orphan_ended, "PostgreSQL did not end the orphaned transaction"
    assert orphan_ended[0] <= IDLE_IN_TRANSACTION_S + 2, orphan_ended
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
    # Every round trip is 1 s slower here: many requests add up to the deadline (before it,
    # 3 of 83 outlived nginx's read timeout).
    assert_answered_within_bounds(result)
    settled = result.after(SETTLE_S)
    assert settled
    assert all(c.ok for c in settled), timeline(result)
    assert rss_after - rss_before < 50, (rss_before, rss_after)
    assert not result.missing_writes()
    assert not result.duplicated_writes()


def test_half_open_connection(healthy_lab: FailureLab) -> None:
    """app1's link to PgBouncer goes silent (no FIN, no reset) for 20 s while app2's stays up.
    app1 detects it per request within the statement timeout (5 s + 1 s backstop; new
    connections within DATABASE_CONNECT_TIMEOUT 3 s) and answers 503; every connection it had
    open to PgBouncer, idle in its pool or not, is gone within the TCP keepalive bound
    (``DEAD_PEER_S``); its readiness fails, so a load balancer would take it out; app2 stays
    ready."""
    lab = healthy_lab
    pgbouncer = (lab.address("pgbouncer"), PGB_PORT)
    open_before: set[int] = set()
    gone_after: list[float] = []

    def cut() -> None:
        open_before.update(lab.net.call("app1", established_to, *pgbouncer))
        lab.net.cut("app1", "pgbouncer")

    still_open: set[int] = set()

    def watch(applied_at: float) -> None:
        # Polled against a deadline: the bound plus slack, far inside the 20 s hold.
        deadline = applied_at + DEAD_PEER_S + 5
        while time.monotonic() < deadline:
            still_open.clear()
            still_open.update(open_before & lab.net.call("app1", established_to, *pgbouncer))
            if not still_open:
                gone_after.append(time.monotonic() - applied_at)
                return
            time.sleep(0.25)

    result = measure_fault(
        lab,
        "app1 <-> PgBouncer half-open",
        apply=cut,
        undo=lab.net.heal_all,
        hold=20.0,
        during=watch,
    )
    report(result)
    print(
        f"  app1's {len(open_before)} connections to PgBouncer all closed "
        f"{gone_after[0] if gone_after else float('nan'):.1f} s after the link went silent "
        f"(keepalive bound {DEAD_PEER_S} s)"
    )
    assert open_before, "app1 had no connection to PgBouncer open when the link was cut"
    assert gone_after, (
        f"app1's connections to PgBouncer from ports {sorted(still_open)} outlived "
        f"{DEAD_PEER_S} + 5 s",
        timeline(result),
    )
    # 11 s from each socket's last answer: one that sent a query just after the cut starts then.
    assert gone_after[0] <= DEAD_PEER_S + 3, gone_after
    assert_answered_within_bounds(result)
    late = [p for p in result.probes if p.at > result.applied_at + 8 and p.path == "/health/ready"]
    assert all(p.status == 503 for p in late if p.instance == "app1")
    assert all(p.status == 200 for p in late if p.instance == "app2")
    assert not result.missing_writes()
    assert all(c.ok for c in result.after(SETTLE_S))


def established_to(address: str, port: int) -> set[int]:
    """Local ports of this namespace's ESTABLISHED TCP connections to ``address:port``
    (/proc/thread-self/net/tcp: the calling thread's network namespace)."""
    want = f"{_hex_ipv4(address)}:{port:04X}"
    ports = set()
    with open("/proc/thread-self/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if remote == want and state == "01":  # TCP_ESTABLISHED
                ports.add(int(local.split(":")[1], 16))
    return ports


def _hex_ipv4(address: str) -> str:
    # /proc/net/tcp prints the address as the host-order integer of the network-order bytes.
    return "".join(f"{int(part):02X}" for part in reversed(address.split(".")))


def _worker_rss_mb(lab: FailureLab) -> float:
    total = 0.0
    for pids in lab.worker_pids().values():
        for pid in pids:
            for line in open(f"/proc/{pid}/status").read().splitlines():  # noqa: SIM115
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
    return total
