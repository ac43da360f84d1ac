"""An outage under load, measured: what the database-outage and PgBouncer-restart tests share.

``measure_outage`` runs client traffic through Nginx, calls ``stop``, keeps the dependency down
for ``down_for`` seconds while probing every instance directly, calls ``start``, and records
when the first request succeeded again. The tests assert the promises on the result:

- during: every API request that arrives once the dependency is gone answers 503
  ``application/problem+json`` (or 2xx), each within 2 s; ``/health/ready`` 503 and
  ``/health/live`` 200 on every instance;
- requests caught in flight by the failure itself get an answer too (2xx or 503 problem+json),
  within PgBouncer's ``query_wait_timeout`` (10 s): a query queued in PgBouncer for a server
  connection at the instant PostgreSQL goes away waits there, not in the app. A write whose
  ``COMMIT`` was on its way when the database went away may instead get the 504
  ``commit-outcome-unknown`` the API documents for exactly that case: it may or may not have
  been applied, and answering 503 ("nothing was applied") would be a lie when it was;
- after: a request succeeds within 5 s of the dependency accepting connections again, and every
  request from then on does; no worker died (same PIDs), nothing restarted;
- no write acknowledged with 201 is missing from PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from traffic import Call, Probe, Tenant, Traffic, probe_instances

from testkit import wait_until
from tools.stack import Stack

ANSWER_WITHIN_S = 2.0
RECOVER_WITHIN_S = 5.0
# pgbouncer.ini query_wait_timeout: the longest a query can queue for a server connection.
CAUGHT_IN_FLIGHT_WITHIN_S = 10.0
CLIENT_TIMEOUT_S = 15.0


@dataclass
class OutageResult:
    calls: list[Call]
    stopped_at: float  # stop() called
    down_at: float  # stop() returned: the dependency is gone
    up_at: float  # start() returned: it accepts connections again
    first_ok_after_up: float | None  # seconds from up_at to the first 2xx answer
    probes: list[Probe] = field(default_factory=list)
    pids_before: dict[int, tuple[int, frozenset[int]]] = field(default_factory=dict)
    pids_after: dict[int, tuple[int, frozenset[int]]] = field(default_factory=dict)
    missing_writes: set[str] = field(default_factory=set)

    def caught(self) -> list[Call]:
        """Calls that started while the dependency was being stopped (in flight at the failure)."""
        return [call for call in self.calls if self.stopped_at <= call.started < self.down_at]

    def during(self) -> list[Call]:
        """Calls that started once the dependency was gone, before it was back."""
        return [call for call in self.calls if self.down_at <= call.started < self.up_at]

    def settled(self) -> list[Call]:
        """Calls that started once the recovery promise had expired."""
        return [c for c in self.calls if c.started >= self.up_at + RECOVER_WITHIN_S]

    def figures(self) -> str:
        during = self.during()
        unavailable = [c for c in during if c.status == 503]
        worst = max((c.elapsed for c in unavailable), default=0.0)
        p50 = sorted(c.elapsed for c in unavailable)[len(unavailable) // 2] if unavailable else 0
        recovery = f"{self.first_ok_after_up:.2f}s" if self.first_ok_after_up is not None else "-"
        caught = max((c.elapsed for c in self.caught()), default=0.0)
        return (
            f"{len(self.calls)} requests; stopping took {self.down_at - self.stopped_at:.2f}s "
            f"({len(self.caught())} requests caught in flight, slowest {caught * 1000:.0f} ms); "
            f"down {self.up_at - self.down_at:.1f}s: "
            f"{len(during)} requests, {len(unavailable)} answered 503 "
            f"(p50 {p50 * 1000:.0f} ms, max {worst * 1000:.0f} ms); "
            f"first 2xx {recovery} after up; "
            f"{len([c for c in self.calls if c.kind == 'create' and c.status == 201])} "
            "writes acknowledged, all present"
            if not self.missing_writes
            else f"MISSING {len(self.missing_writes)}"
        )


def timeline(result: OutageResult, bucket: float = 1.0) -> str:
    """Per ``bucket`` seconds around the outage: outcomes and the slowest answer (diagnostics)."""
    rows: dict[int, list[Call]] = {}
    for call in result.calls:
        rows.setdefault(int((call.started - result.down_at) // bucket), []).append(call)
    lines = [f"t=0: stopped (up again at t={result.up_at - result.down_at:.1f}s)"]
    for slot in sorted(rows):
        calls = rows[slot]
        counts: dict[str, int] = {}
        for call in calls:
            label = str(call.status) if call.status is not None else "none"
            counts[label] = counts.get(label, 0) + 1
        worst = max(call.elapsed for call in calls)
        lines.append(
            f"t={slot * bucket:+6.1f}s {dict(sorted(counts.items()))} max {worst * 1000:.0f} ms"
        )
    return "\n".join(lines)


def _pids(stack: Stack) -> dict[int, tuple[int, frozenset[int]]]:
    return {i.index: (i.master_pid, frozenset(i.worker_pids())) for i in stack.instances}


def measure_outage(
    stack: Stack,
    tenant: Tenant,
    *,
    stop: Callable[[], object],
    start: Callable[[], object],
    down_for: float = 10.0,
) -> OutageResult:
    pids_before = _pids(stack)
    probes: list[Probe] = []
    # retries=0: an unanswered request is a failure here, not something to paper over.
    with Traffic(
        stack.url, tenant.key, clients=4, retries=0, pause=0.02, timeout=CLIENT_TIMEOUT_S
    ) as traffic:
        traffic.wait_for(40)
        stopped_at = time.monotonic()
        stop()
        down_at = time.monotonic()
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < down_at + down_for:
                probe_instances(stack.instances, client, probes)
                time.sleep(0.5)
        start()
        up_at = time.monotonic()

        def recovered() -> float | None:
            oks = [c.finished for c in traffic.snapshot() if c.ok and c.started >= up_at]
            return min(oks) - up_at if oks else None

        try:
            first_ok: float | None = wait_until(
                recovered, timeout=20, interval=0.02, what="a 2xx after the outage"
            )
        except TimeoutError:
            first_ok = None
        # Then enough traffic past the recovery deadline to show it stays recovered.
        deadline = up_at + RECOVER_WITHIN_S
        wait_until(lambda: time.monotonic() > deadline, timeout=RECOVER_WITHIN_S + 1)
        traffic.wait_for(60)
    acknowledged = traffic.acknowledged_titles()
    rows = stack.psql(f"SELECT title FROM tasks WHERE owner_id = '{tenant.owner_id}'").splitlines()
    return OutageResult(
        calls=traffic.calls,
        stopped_at=stopped_at,
        down_at=down_at,
        up_at=up_at,
        first_ok_after_up=first_ok,
        probes=probes,
        pids_before=pids_before,
        pids_after=_pids(stack),
        missing_writes=acknowledged - set(rows),
    )


def _answered(call: Call) -> bool:
    """A 2xx, or the outage's 503 problem+json (nothing was applied)."""
    return call.ok or (call.status == 503 and call.problem_json)


def _commit_outcome_unknown(call: Call) -> bool:
    """A write whose COMMIT got no answer: 504, and the problem says so."""
    return (
        call.kind == "create"
        and call.status == 504
        and call.problem_type.endswith("/commit-outcome-unknown")
    )


def assert_outage_promises(result: OutageResult) -> None:
    unanswered = [c for c in result.calls if c.status is None]
    assert not unanswered, [str(c) for c in unanswered[:10]]

    caught, during = result.caught(), result.during()
    unavailable = [c for c in during if c.status == 503]
    assert len(unavailable) >= 5, f"the outage was not observed: {len(unavailable)} x 503"
    wrong = [c for c in caught if not (_answered(c) or _commit_outcome_unknown(c))]
    wrong += [c for c in during if not _answered(c)]
    assert not wrong, [f"{c} {c.content_type} {c.problem_type}" for c in wrong[:10]]
    slow = [c for c in during if c.elapsed > ANSWER_WITHIN_S]
    assert not slow, [str(c) for c in slow[:10]]
    stuck = [c for c in caught if c.elapsed > CAUGHT_IN_FLIGHT_WITHIN_S]
    assert not stuck, [str(c) for c in stuck[:10]]

    down_probes = [p for p in result.probes if p.at >= result.down_at + 1.0]
    ready = [p for p in down_probes if p.path == "/health/ready"]
    live = [p for p in down_probes if p.path == "/health/live"]
    assert ready, "no probes ran during the outage"
    assert all(p.status == 503 for p in ready), [(p.instance, p.status) for p in ready]
    assert all(p.status == 200 for p in live), [(p.instance, p.status) for p in live]

    assert result.first_ok_after_up is not None, "no request succeeded after the outage"
    assert result.first_ok_after_up <= RECOVER_WITHIN_S, result.figures()
    settled = result.settled()
    assert settled, "no traffic after the recovery deadline"
    failing = [c for c in settled if not c.ok]
    assert not failing, [str(c) for c in failing[:10]]

    assert result.pids_after == result.pids_before, "a worker or master was replaced"
    assert not result.missing_writes, sorted(result.missing_writes)[:10]
