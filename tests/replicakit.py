"""A real primary and a real streaming replica, both of their own, for the replica tests.

The pair is always started here from the embedded PostgreSQL 16 binaries (the ones the suite
already uses), whatever ``TEST_DATABASE_URL`` says: the tests pause replay, stop and start the
replica, and read both servers' statement logs, which nobody may do to a shared server.

The replica is made the way an operator makes one: ``pg_basebackup -R`` over a physical
replication slot (``EmbeddedPostgres.create_replica``). Both servers log every statement with
the connection's ``application_name`` (``log_statement = all``), so a test sees which server
ran a request's query, and with which parameters, from the server's side.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from service.replica import parse_lsn
from service.tools.embedded_postgres import EmbeddedPostgres
from testkit import wait_until

T = TypeVar("T")

LOGGING = (
    "\n# replica tests: every statement, with the client's application_name\n"
    "log_statement = 'all'\n"
    "log_line_prefix = '%m [%p] app=%a '\n"
)
# One log record: "<timestamp> UTC [pid] app=<name> LOG:  ..." up to the next record.
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \S+ \[(\d+)\] app=(\S*) ", re.M)


@dataclass(frozen=True)
class Statement:
    """A statement a server ran, as its log tells it (SQL and bound parameters together)."""

    pid: int
    application_name: str
    text: str


def _statements(log_text: str) -> list[Statement]:
    starts = list(_RECORD.finditer(log_text))
    records = [
        (
            int(m[1]),
            m[2],
            log_text[m.end() : (starts[i + 1].start() if i + 1 < len(starts) else None)],
        )
        for i, m in enumerate(starts)
    ]
    found: list[Statement] = []
    for pid, app, body in records:
        if body.startswith("DETAIL:") and found and found[-1].pid == pid:
            # The bound parameters of the statement just logged by the same backend.
            last = found.pop()
            found.append(Statement(pid, app, last.text + "\n" + body))
        elif body.startswith(("LOG:  execute", "LOG:  statement")):
            found.append(Statement(pid, app, body))
    return found


class ServerLog:
    """A server's log file, read from a mark onwards."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def statements_since(self, mark: int) -> list[Statement]:
        with self.path.open("rb") as handle:
            handle.seek(mark)
            return _statements(handle.read().decode("utf-8", "replace"))


@dataclass
class ReplicatedPostgres:
    primary: EmbeddedPostgres
    replica: EmbeddedPostgres

    @property
    def primary_url(self) -> str:
        return self.primary.url

    @property
    def replica_url(self) -> str:
        return self.replica.url

    @property
    def primary_log(self) -> ServerLog:
        return ServerLog(self.primary.log_file)

    @property
    def replica_log(self) -> ServerLog:
        return ServerLog(self.replica.log_file)

    # --- replay control ---------------------------------------------------------------------
    def pause_replay(self) -> None:
        self.replica.psql("SELECT pg_wal_replay_pause()")
        wait_until(
            lambda: self.replica.psql("SELECT pg_get_wal_replay_pause_state()") == "paused",
            timeout=30.0,
            what="replay paused",
        )

    def resume_replay(self) -> None:
        self.replica.psql("SELECT pg_wal_replay_resume()")

    def replay_paused(self) -> bool:
        return self.replica.psql("SELECT pg_get_wal_replay_pause_state()") != "not paused"

    def caught_up(self) -> bool:
        """The replica has replayed everything the primary has flushed so far."""
        target = parse_lsn(self.primary.psql("SELECT pg_current_wal_flush_lsn()"))
        replayed = self.replica.psql("SELECT pg_last_wal_replay_lsn()")
        return bool(replayed) and parse_lsn(replayed) >= target

    def wait_caught_up(self, timeout: float = 30.0) -> None:
        wait_until(self.caught_up, timeout=timeout, what="replica caught up")

    @contextmanager
    def replay_paused_for(self) -> Iterator[None]:
        """Replay paused inside the block, resumed (and caught up) after it, even on failure."""
        self.pause_replay()
        try:
            yield
        finally:
            self.resume_replay()
            self.wait_caught_up()

    @contextmanager
    def replica_stopped(self) -> Iterator[None]:
        self.replica.stop(mode="fast")
        try:
            yield
        finally:
            self.replica.start()
            self.wait_caught_up()

    def close(self) -> None:
        for server in (self.replica, self.primary):
            server.stop(mode="immediate")


async def eventually(
    probe: Callable[[], Awaitable[T]], *, timeout: float = 20.0, what: str = ""
) -> T:
    """Await ``probe`` until it returns something truthy (async code must not block to poll)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: {result!r}")
        await asyncio.sleep(0.05)


def start_pair(data_dir: Path | None = None) -> tuple[ReplicatedPostgres, Path]:
    """Primary (database ``app``) and its streaming replica, both logging statements."""
    base = data_dir or Path(tempfile.mkdtemp(prefix="fastapi-app-replica-"))
    primary = EmbeddedPostgres(base / "primary", database="app").start()
    try:
        with (primary.pgdata / "postgresql.conf").open("a") as conf:
            conf.write(LOGGING)
        primary.psql("SELECT pg_reload_conf()")
        replica = primary.create_replica(base / "replica", slot="test_replica")
        replica.start()
    except BaseException:
        primary.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)
        raise
    pair = ReplicatedPostgres(primary, replica)
    pair.wait_caught_up()
    return pair, base
