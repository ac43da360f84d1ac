"""The replica monitor's arithmetic: WAL positions, the lag estimate, and the routing decision.

The positions the servers report are scripted here (the real servers are in
tests/integration/test_replica_streaming.py); the clock is a variable, so every lag is exact.
"""

from __future__ import annotations

from typing import Any

import pytest

from service.replica import (
    ReplicaMonitor,
    ReplicaState,
    ReplicaStatus,
    Route,
    format_lsn,
    parse_lsn,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [("0/0", 0), ("0/3000148", 0x3000148), ("16/B374D848", (0x16 << 32) | 0xB374D848)],
)
def test_wal_positions_round_trip(text: str, value: int) -> None:
    assert parse_lsn(text) == value
    assert format_lsn(value) == text


@pytest.mark.parametrize(
    "bad", ["", "0", "0/", "/0", "1/2/3", "g/0", "+1/0", "1_0/0", " 0/0", "123456789/0"]
)
def test_anything_else_is_not_a_position(bad: str) -> None:
    with pytest.raises(ValueError, match="not a WAL position"):
        parse_lsn(bad)


class Scripted(ReplicaMonitor):
    """Answers polls from two lists instead of two servers."""

    def __init__(self, **kwargs: Any) -> None:
        self.now = 100.0
        self.primary: list[int | None] = []
        self.replica: list[int | None] = []
        self.seen: list[ReplicaStatus] = []
        super().__init__(
            object(),  # type: ignore[arg-type]
            object(),  # type: ignore[arg-type]
            poll_seconds=1,
            query_timeout=1,
            on_status=self.seen.append,
            clock=lambda: self.now,
            **kwargs,
        )

    async def _position(self, engine: Any, sql: object) -> int | None:
        script = self.primary if engine is self._primary else self.replica
        return script.pop(0)

    async def step(self, primary: int | None, replica: int | None, *, after: float) -> Any:
        self.now += after
        self.primary.append(primary)
        self.replica.append(replica)
        return await self.poll()


async def test_lag_is_the_age_of_the_oldest_position_not_replayed() -> None:
    monitor = Scripted(max_lag_seconds=5)
    assert monitor.route(None) is Route.PRIMARY  # not measured yet
    status = await monitor.step(100, 100, after=0)
    assert (status.state, status.lag_seconds) == (ReplicaState.STREAMING, 0.0)
    # The primary moves on, the replica stops replaying (paused, or cut off from the primary).
    await monitor.step(200, 100, after=1)
    assert monitor.lag_seconds == 0.0  # just seen: behind, but not for long yet
    await monitor.step(300, 100, after=3)
    assert monitor.lag_seconds == 3.0
    status = await monitor.step(400, 100, after=3)
    assert (status.state, status.lag_seconds) == (ReplicaState.LAGGING, 6.0)
    assert monitor.route(None) is Route.PRIMARY
    # It replays up to 300: the lag is now measured from when 400 was seen.
    status = await monitor.step(400, 300, after=1)
    assert (status.state, status.lag_seconds) == (ReplicaState.STREAMING, 1.0)
    status = await monitor.step(400, 400, after=1)
    assert status.lag_seconds == 0.0
    assert [s.state for s in monitor.seen].count(ReplicaState.LAGGING) == 1


async def test_an_idle_primary_never_makes_a_caught_up_replica_look_late() -> None:
    monitor = Scripted(max_lag_seconds=1)
    for _ in range(5):
        status = await monitor.step(500, 500, after=60)
        assert (status.state, status.lag_seconds) == (ReplicaState.STREAMING, 0.0)


async def test_routing_by_token() -> None:
    monitor = Scripted(max_lag_seconds=5)
    await monitor.step(1000, 900, after=0)
    assert monitor.route(None) is Route.REPLICA
    assert monitor.route(900) is Route.REPLICA  # replayed at the last poll: no query needed
    assert monitor.route(901) is Route.CHECK  # newer than the last poll: ask the replica
    monitor.replayed(950)  # a check saw 950 replayed
    assert monitor.route(950) is Route.REPLICA
    monitor.replayed(10)  # positions never go backwards
    assert monitor.replay_lsn == 950


async def test_a_replica_that_does_not_answer_gets_no_reads_until_it_does() -> None:
    monitor = Scripted(max_lag_seconds=5)
    await monitor.step(100, 100, after=0)
    status = await monitor.step(200, None, after=1)
    assert status.state is ReplicaState.UNAVAILABLE
    assert monitor.route(None) is Route.PRIMARY
    # Still down while the primary writes: what it misses keeps ageing.
    status = await monitor.step(300, None, after=10)
    assert status.lag_seconds == 10.0
    status = await monitor.step(300, 300, after=1)
    assert (status.state, status.lag_seconds) == (ReplicaState.STREAMING, 0.0)
    # A failed read marks it down at once, without waiting for the next poll.
    monitor.mark_unavailable()
    assert monitor.route(None) is Route.PRIMARY
    assert monitor.seen[-1].state is ReplicaState.UNAVAILABLE


async def test_an_unreachable_primary_leaves_the_replica_serving() -> None:
    """Reads keep working on the replica while the primary is away (it has what it has)."""
    monitor = Scripted(max_lag_seconds=5)
    await monitor.step(100, 100, after=0)
    status = await monitor.step(None, 100, after=1)
    assert status.state is ReplicaState.STREAMING
    assert monitor.route(None) is Route.REPLICA
