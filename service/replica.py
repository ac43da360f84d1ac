"""Where a read may run: the replica's replay position and lag, tracked in the background.

A read may run on the streaming replica when the replica is caught up well enough for it:

- a read without a consistency token needs only a replica that answers and whose replay lag is
  at most DATABASE_READ_MAX_LAG_SECONDS (it may be stale by up to that much, never wrong: a
  replica replays the primary's commits in order, so it shows the primary as it was);
- a read carrying a token (the WAL position of the caller's last write, see ``Database.read``)
  needs a replica that has replayed at least that position, or its own write could be missing.

The monitor answers both from what its last poll saw, so routing costs no query. Only a token
newer than that poll costs a round trip: the replica is asked on the connection that then runs
the read (replay never goes backwards, so what the check saw is still there for the read).

Lag is measured against the primary, not from the replica's clock: every poll records the
primary's flushed WAL position, and the lag is the age of the oldest recorded position the
replica has not replayed yet (0 once it has replayed them all). A replica that stopped
receiving WAL (its connection to the primary broke) therefore shows a growing lag as soon as the
primary writes anything, and an idle primary never makes a healthy replica look late, which
``now() - pg_last_xact_replay_timestamp()`` would. The resolution is the poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

log = structlog.get_logger("service.replica")

# The replica's replay position; a server that is not a standby (DATABASE_READ_URL naming a
# primary, as in development) has everything it has: its own current position.
# The comments name each statement's purpose in the server's statement log and
# pg_stat_activity, where the monitor's polls and a read's token check would otherwise look alike.
_REPLICA_POSITION = (
    "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
    "ELSE pg_current_wal_lsn() END::text"
)
REPLICA_POSITION_SQL = text(_REPLICA_POSITION + " /* replica-monitor */")
TOKEN_CHECK_SQL = text(_REPLICA_POSITION + " /* consistency-token-check */")
PRIMARY_POSITION_SQL = text("SELECT pg_current_wal_flush_lsn()::text /* replica-monitor */")
# Far more polls than any lag worth measuring; when full, newer positions are not recorded,
# which keeps the oldest (the one the lag is measured from).
MAX_PENDING_POSITIONS = 100_000
_LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


class ReplicaState(StrEnum):
    DISABLED = "disabled"  # no DATABASE_READ_URL
    STARTING = "starting"  # not polled yet: reads go to the primary
    STREAMING = "streaming"  # answers, lag within DATABASE_READ_MAX_LAG_SECONDS
    LAGGING = "lagging"  # answers, lag above it: reads go to the primary
    UNAVAILABLE = "unavailable"  # does not answer: reads go to the primary


class Route(StrEnum):
    REPLICA = "replica"
    PRIMARY = "primary"
    CHECK = "check"  # the replica, once it confirms it has replayed the token


def parse_lsn(value: str) -> int:
    """``16/B374D848`` -> an integer; ``ValueError`` for anything that is not a pg_lsn."""
    match = _LSN.fullmatch(value)
    if match is None:
        raise ValueError("not a WAL position")
    return (int(match[1], 16) << 32) | int(match[2], 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


@dataclass(frozen=True)
class ReplicaStatus:
    state: ReplicaState
    lag_seconds: float | None
    replay_lsn: int | None


class ReplicaMonitor:
    """Polls the primary's and the replica's WAL positions; decides where reads go."""

    def __init__(
        self,
        primary: AsyncEngine,
        replica: AsyncEngine,
        *,
        max_lag_seconds: float,
        poll_seconds: float,
        query_timeout: float,
        autocommit: bool = False,
        on_status: Callable[[ReplicaStatus], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Autocommit (direct connections): one round trip per position instead of BEGIN,
        # SELECT, ROLLBACK. Behind PgBouncer a statement keeps its transaction (see db.py).
        if autocommit:
            primary = primary.execution_options(isolation_level="AUTOCOMMIT")
            replica = replica.execution_options(isolation_level="AUTOCOMMIT")
        self._primary = primary
        self._replica = replica
        self.max_lag_seconds = max_lag_seconds
        self.poll_seconds = poll_seconds
        self._query_timeout = query_timeout
        self._on_status = on_status
        self._clock = clock
        self._pending: deque[tuple[float, int]] = deque()
        self._task: asyncio.Task[None] | None = None
        self.state = ReplicaState.STARTING
        self.replay_lsn: int | None = None
        self.lag_seconds: float | None = None

    # --- routing (no I/O) ---------------------------------------------------------------------
    def route(self, token: int | None) -> Route:
        if self.state is not ReplicaState.STREAMING:
            return Route.PRIMARY
        if token is None or (self.replay_lsn is not None and token <= self.replay_lsn):
            return Route.REPLICA
        return Route.CHECK

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(self.state, self.lag_seconds, self.replay_lsn)

    def replayed(self, position: int) -> None:
        """A check on the replica saw ``position`` replayed: later tokens up to it need none."""
        if self.replay_lsn is None or position > self.replay_lsn:
            self.replay_lsn = position

    def mark_unavailable(self) -> None:
        """A read could not reach the replica: stop sending reads there until a poll succeeds."""
        if self.state is not ReplicaState.UNAVAILABLE:
            log.warning("replica_unavailable", source="read")
            self._set(ReplicaState.UNAVAILABLE)

    # --- polling ------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="replica-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:  # pragma: no cover - poll() handles the failures it expects
                log.exception("replica_poll_failed")
            await asyncio.sleep(self.poll_seconds)

    async def poll(self) -> ReplicaStatus:
        """One measurement: the primary's position first, then how far the replica replayed."""
        now = self._clock()
        primary_lsn = await self._position(self._primary, PRIMARY_POSITION_SQL)
        if primary_lsn is not None:
            last = self._pending[-1][1] if self._pending else -1
            if primary_lsn > last and len(self._pending) < MAX_PENDING_POSITIONS:
                self._pending.append((now, primary_lsn))
        replay_lsn = await self._position(self._replica, REPLICA_POSITION_SQL)
        if replay_lsn is None:
            if self.state is not ReplicaState.UNAVAILABLE:
                log.warning("replica_unavailable", source="poll")
            # What it had replayed is unknown now; what the primary wrote since still ages.
            self.replay_lsn = None
            self.lag_seconds = now - self._pending[0][0] if self._pending else self.lag_seconds
            self._set(ReplicaState.UNAVAILABLE)
            return self.status()
        while self._pending and self._pending[0][1] <= replay_lsn:
            self._pending.popleft()
        self.replay_lsn = replay_lsn
        self.lag_seconds = now - self._pending[0][0] if self._pending else 0.0
        state = (
            ReplicaState.LAGGING
            if self.lag_seconds > self.max_lag_seconds
            else ReplicaState.STREAMING
        )
        if state is not self.state:
            log.info("replica_state", state=state.value, lag_seconds=round(self.lag_seconds, 3))
        self._set(state)
        return self.status()

    async def _position(self, engine: AsyncEngine, sql: object) -> int | None:
        try:
            async with asyncio.timeout(self._query_timeout), engine.connect() as conn:
                value = await conn.scalar(sql)  # type: ignore[call-overload]
        except Exception:
            # Refused, timed out, shutting down: the reason is for the server's log, not ours
            # (and driver messages can carry connection details).
            return None
        return parse_lsn(value) if isinstance(value, str) else None

    def _set(self, state: ReplicaState) -> None:
        self.state = state
        if self._on_status is not None:
            self._on_status(self.status())
