"""One fault under load, measured from the lab's client host: what every scenario shares.

``measure_fault`` runs client loops through nginx (no client retries: an unanswered request is
a failure, not something to paper over), applies the fault, holds it while probing both app
instances' liveness and readiness every half second, undoes it, and records when the first
request succeeded again. The scenarios assert their promises on the result and print its
``figures()`` (docs/reliability.md quotes them).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from lab import FailureLab
from netlab import enter
from traffic import Call, Probe, probe_instances

from testkit import wait_until

CLIENT_TIMEOUT_S = 60.0  # far above every bound under test: a hang shows as a slow answer


@dataclass
class FaultResult:
    name: str
    calls: list[Call]
    applied_at: float
    healed_at: float
    first_ok_after_heal: float | None
    probes: list[Probe] = field(default_factory=list)
    stored: dict[str, int] = field(default_factory=dict)
    pids_before: dict[str, set[int]] = field(default_factory=dict)
    pids_after: dict[str, set[int]] = field(default_factory=dict)

    def during(self, settle: float = 0.0) -> list[Call]:
        return [c for c in self.calls if self.applied_at + settle <= c.started < self.healed_at]

    def after(self, settle: float) -> list[Call]:
        return [c for c in self.calls if c.started >= self.healed_at + settle]

    def acknowledged(self) -> set[str]:
        return {c.title for c in self.calls if c.kind == "create" and c.status == 201}

    def missing_writes(self) -> set[str]:
        return self.acknowledged() - set(self.stored)

    def duplicated_writes(self) -> dict[str, int]:
        return {title: n for title, n in self.stored.items() if n != 1}

    def figures(self) -> str:
        during = self.during()
        statuses: dict[str, int] = {}
        for call in during:
            label = str(call.status) if call.status is not None else "none"
            statuses[label] = statuses.get(label, 0) + 1
        slowest = max((c.elapsed for c in during), default=0.0)
        p50 = sorted(c.elapsed for c in during)[len(during) // 2] if during else 0.0
        ready = [p for p in self.probes if p.path == "/health/ready" and p.at > self.applied_at]
        live = [p for p in self.probes if p.path == "/health/live" and p.at > self.applied_at]
        recovery = (
            f"{self.first_ok_after_heal:.1f} s" if self.first_ok_after_heal is not None else "never"
        )
        return (
            f"{self.name}: fault held {self.healed_at - self.applied_at:.0f} s; "
            f"{len(during)} requests during it {dict(sorted(statuses.items()))}, "
            f"p50 {p50 * 1000:.0f} ms, slowest {slowest:.1f} s; "
            f"readiness 503 in {sum(p.status == 503 for p in ready)}/{len(ready)} probes, "
            f"liveness 200 in {sum(p.status == 200 for p in live)}/{len(live)}; "
            f"first 2xx {recovery} after healing; "
            f"{len(self.acknowledged())} writes acknowledged, "
            f"{len(self.missing_writes())} missing, {len(self.duplicated_writes())} duplicated"
        )


def _probe_loop(lab: FailureLab, until: float, probes: list[Probe]) -> None:
    enter(lab.net["client"].namespace)
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < until:
            probe_instances(lab.instances, client, probes)
            time.sleep(0.5)  # the probing interval, not a wait for something


def measure_fault(
    lab: FailureLab,
    name: str,
    *,
    apply: Callable[[], object],
    undo: Callable[[], object],
    hold: float,
    clients: int = 4,
    after: float = 15.0,
    during: Callable[[float], object] | None = None,
) -> FaultResult:
    import threading

    owner = f"lab-{uuid.uuid4().hex[:10]}"
    key = lab.create_api_key(owner)
    pids_before = lab.worker_pids()
    probes: list[Probe] = []
    with lab.traffic(
        key, clients=clients, retries=0, pause=0.02, timeout=CLIENT_TIMEOUT_S
    ) as traffic:
        traffic.wait_for(30, timeout=60)
        applied_at = time.monotonic()
        apply()
        prober = threading.Thread(
            target=_probe_loop, args=(lab, applied_at + hold, probes), daemon=True
        )
        prober.start()
        if during is not None:
            during(applied_at)
        # The prober runs until applied_at + hold: joining it is holding the fault.
        prober.join(hold + 10)
        undo()
        healed_at = time.monotonic()

        def first_success() -> float | None:
            oks = [c.finished for c in traffic.snapshot() if c.ok and c.started >= healed_at]
            return min(oks) - healed_at if oks else None

        first_ok: float | None
        try:
            first_ok = wait_until(first_success, timeout=60, interval=0.1, what="recovery")
        except TimeoutError:
            first_ok = None  # the scenario's recovery assertion reports it, with its figures
        # The observation window after recovery: traffic keeps running for ``after`` seconds.
        time.sleep(max(0.0, healed_at + (first_ok or 0) + after - time.monotonic()))
        traffic.wait_for(20, timeout=CLIENT_TIMEOUT_S)
    owner_id = _owner_id(owner)
    rows = lab.psql(
        f"SELECT title, count(*) FROM tasks WHERE owner_id = '{owner_id}' GROUP BY title"
    ).splitlines()
    stored = {title: int(count) for title, count in (row.split("|") for row in rows if row)}
    return FaultResult(
        name=name,
        calls=traffic.calls,
        applied_at=applied_at,
        healed_at=healed_at,
        first_ok_after_heal=first_ok,
        probes=probes,
        stored=stored,
        pids_before=pids_before,
        pids_after=lab.worker_pids(),
    )


def _owner_id(owner: str) -> uuid.UUID:
    from service.security.principal import owner_id_from

    return owner_id_from(owner)
