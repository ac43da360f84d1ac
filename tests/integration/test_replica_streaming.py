"""Reads on a real streaming replica: what a client sees when it lags, stops and comes back.

The pair (tests/replicakit.py) is a primary and a ``pg_basebackup -R`` standby streaming over a
replication slot. Where a request's query ran is read from the servers' own statement logs
(``application_name`` and bound parameters), not from the app's opinion of where it sent it.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from replicakit import ReplicatedPostgres, Statement, eventually, start_pair

import appkit
from service.db import Database
from service.http.state import app_runtime
from service.migrate import upgrade
from service.replica import ReplicaState, parse_lsn
from service.security.api_keys import ApiKeyRepository
from service.settings import Settings, load_settings

TOKEN = "Consistency-Token"


@pytest.fixture(scope="module")
def pair() -> Iterator[ReplicatedPostgres]:
    replicated, data_dir = start_pair()
    try:
        yield replicated
    finally:
        replicated.close()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
async def migrated(pair: ReplicatedPostgres) -> ReplicatedPostgres:
    await upgrade(pair.primary_url)
    pair.wait_caught_up()
    return pair


def settings_for(pair: ReplicatedPostgres, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "app_name": f"replica-{uuid.uuid4().hex[:8]}",
        "database_url": pair.primary_url,
        "database_read_url": pair.replica_url,
        "rate_limit_enabled": False,
        "log_level": "WARNING",
        "database_read_lag_poll_seconds": 0.1,
        "database_connect_timeout": 2.0,
    }
    values.update(overrides)
    return load_settings(**values)


@dataclass
class App:
    client: httpx.AsyncClient
    database: Database
    settings: Settings
    headers: dict[str, str]
    registry: Any

    @property
    def monitor(self) -> Any:
        assert self.database.replica is not None
        return self.database.replica

    def reads(self, target: str, reason: str | None = None) -> float:
        total = 0.0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name != "db_reads_total" or sample.labels["target"] != target:
                    continue
                if reason is None or sample.labels["reason"] == reason:
                    total += sample.value
        return total

    def gauge(self, name: str) -> float | None:
        value = self.registry.get_sample_value(name)
        return float(value) if value is not None else None


@asynccontextmanager
async def app_on(pair: ReplicatedPostgres, **overrides: Any) -> AsyncIterator[App]:
    settings = settings_for(pair, **overrides)
    async with appkit.serving(settings) as served:
        database: Database = served.state.database
        owner = uuid.uuid4()
        async for session in database.session():
            key, _ = await ApiKeyRepository(session).create(
                owner_id=owner, scopes=["tasks:read", "tasks:write"]
            )
        app = App(
            served.client,
            database,
            settings,
            {"X-API-Key": key},
            app_runtime(served.app).metrics.registry,
        )
        # The key was written on the primary; the API key check reads it there too, but the
        # replica should have it before reads are measured.
        pair.wait_caught_up()
        await eventually(
            _state_is(app, ReplicaState.STREAMING), what="replica monitor reports streaming"
        )
        yield app


def _state_is(app: App, state: ReplicaState) -> Any:
    async def probe() -> bool:
        return bool(app.monitor.state is state)

    return probe


def ran_on(statements: list[Statement], app: App, role: str, needle: str) -> list[Statement]:
    name = f"{app.settings.app_name}-{role}"
    return [s for s in statements if s.application_name == name and needle in s.text]


async def test_reads_land_on_the_replica_when_it_is_caught_up(migrated: ReplicatedPostgres) -> None:
    async with app_on(migrated) as app:
        created = await app.client.post("/v1/tasks", json={"title": "routed"}, headers=app.headers)
        assert created.status_code == 201, created.text
        token = created.headers[TOKEN]
        task_id = created.json()["id"]
        migrated.wait_caught_up()
        await eventually(_replayed(app, parse_lsn(token)), what="monitor saw the write replayed")

        replica_mark, primary_mark = migrated.replica_log.mark(), migrated.primary_log.mark()
        marker = f"marker{uuid.uuid4().hex[:12]}"
        listed = await app.client.get("/v1/tasks", params={"q": marker}, headers=app.headers)
        fetched = await app.client.get(f"/v1/tasks/{task_id}", headers=app.headers)
        with_token = await app.client.get(
            f"/v1/tasks/{task_id}", headers={**app.headers, TOKEN: token}
        )
        assert listed.status_code == 200
        assert listed.json()["items"] == []
        assert fetched.status_code == 200
        assert fetched.json()["title"] == "routed"
        assert with_token.status_code == 200
        assert with_token.json()["title"] == "routed"

        # The replica's own log: both reads of the task and the search ran there, from the
        # app's replica pool; the primary ran none of them.
        on_replica = migrated.replica_log.statements_since(replica_mark)
        on_primary = migrated.primary_log.statements_since(primary_mark)
        assert ran_on(on_replica, app, "replica", marker), on_replica
        assert len(ran_on(on_replica, app, "replica", task_id)) == 2, on_replica
        assert not ran_on(on_primary, app, "primary", task_id)
        assert not ran_on(on_primary, app, "primary", marker)
        # A token the monitor had already seen replayed costs no query on the replica.
        assert not ran_on(on_replica, app, "replica", "consistency-token-check")
        # One statement per read, nothing around it (direct mode reads in autocommit): besides
        # the monitor's polls and a new connection's set-up (asyncpg's jit/type queries), the
        # app's replica connections ran the three SELECTs and no BEGIN, COMMIT or check.
        ours = [
            s.text
            for s in on_replica
            if s.application_name == f"{app.settings.app_name}-replica"
            and "replica-monitor" not in s.text
            and "pg_catalog" not in s.text
            and "'jit'" not in s.text
        ]
        assert len(ours) == 3, ours
        assert all("FROM tasks" in text for text in ours), ours
        assert app.reads("primary") == 0


def _replayed(app: App, position: int) -> Any:
    async def probe() -> bool:
        replayed = app.monitor.replay_lsn
        return replayed is not None and replayed >= position

    return probe


async def test_own_writes_are_never_missed_while_replay_is_paused(
    migrated: ReplicatedPostgres,
) -> None:
    """Create-then-read by the same client: never a 404, though the replica has not seen it.

    The lag threshold is high, so the replica stays "streaming" while paused and token-less
    reads keep going there: they show the stale (but consistent) past, which proves the replica
    really is behind while the token-carrying reads see every write.
    """
    async with app_on(migrated, database_read_max_lag_seconds=600) as app:
        first = await app.client.post("/v1/tasks", json={"title": "v1"}, headers=app.headers)
        assert first.status_code == 201
        task_url = f"/v1/tasks/{first.json()['id']}"
        migrated.wait_caught_up()

        with migrated.replay_paused_for():
            replica_mark = migrated.replica_log.mark()
            for n in range(10):
                created = await app.client.post(
                    "/v1/tasks", json={"title": f"while paused {n}"}, headers=app.headers
                )
                assert created.status_code == 201, created.text
                token = created.headers[TOKEN]
                read = await app.client.get(
                    created.headers["Location"], headers={**app.headers, TOKEN: token}
                )
                assert read.status_code == 200, read.text
                assert read.json()["title"] == f"while paused {n}"

            patched = await app.client.patch(
                task_url,
                json={"title": "v2"},
                headers={**app.headers, "Content-Type": "application/merge-patch+json"},
            )
            assert patched.status_code == 200
            token = patched.headers[TOKEN]
            mine = await app.client.get(task_url, headers={**app.headers, TOKEN: token})
            assert (mine.json()["title"], mine.headers["ETag"]) == ("v2", '"2"')
            listed = await app.client.get("/v1/tasks", headers={**app.headers, TOKEN: token})
            assert len(listed.json()["items"]) == 11

            # Another client (no token): the replica's past, whole and consistent.
            stale = await app.client.get(task_url, headers=app.headers)
            assert stale.status_code == 200
            assert (stale.json()["title"], stale.json()["version"]) == ("v1", 1)
            assert stale.headers["ETag"] == '"1"'
            stale_list = await app.client.get("/v1/tasks", headers=app.headers)
            assert [item["title"] for item in stale_list.json()["items"]] == ["v1"]
            unseen = await app.client.get(created.headers["Location"], headers=app.headers)
            assert unseen.status_code == 404

            # The replica was asked (one cheap query) and was behind: the primary served them.
            checks = ran_on(
                migrated.replica_log.statements_since(replica_mark),
                app,
                "replica",
                "consistency-token-check",
            )
            # Exactly one check per read with a token (12), each found the replica behind, so
            # each of those reads then ran on the primary: one round trip more, never more.
            assert len(checks) == 12, checks
            assert app.reads("primary", "behind-token") == 12

        # Resumed: the token-less reader catches up.
        async def fresh() -> bool:
            response = await app.client.get(task_url, headers=app.headers)
            return response.json()["title"] == "v2"

        await eventually(fresh, what="token-less read sees v2 after replay resumed")


async def test_create_then_read_with_live_replication_never_404(
    migrated: ReplicatedPostgres,
) -> None:
    """The race every replica setup has: read straight after the write, replication live."""
    async with app_on(migrated) as app:
        for n in range(40):
            created = await app.client.post(
                "/v1/tasks", json={"title": f"race {n}"}, headers=app.headers
            )
            assert created.status_code == 201
            read = await app.client.get(
                created.headers["Location"], headers={**app.headers, TOKEN: created.headers[TOKEN]}
            )
            assert read.status_code == 200, (n, read.text)
        served_by_replica = app.reads("replica")
        assert served_by_replica + app.reads("primary") == 40


async def test_lag_above_the_threshold_moves_reads_to_the_primary_and_back(
    migrated: ReplicatedPostgres,
) -> None:
    async with app_on(migrated, database_read_max_lag_seconds=0.5) as app:
        assert app.gauge("db_replica_lag_seconds") == 0
        assert app.gauge("db_replica_up") == 1
        with migrated.replay_paused_for():
            created = await app.client.post("/v1/tasks", json={"title": "lag"}, headers=app.headers)
            assert created.status_code == 201
            await eventually(_state_is(app, ReplicaState.LAGGING), what="lagging")
            lag = app.gauge("db_replica_lag_seconds")
            assert lag is not None
            assert lag > 0.5

            ready = await app.client.get("/health/ready")
            assert ready.status_code == 200
            assert ready.json()["replica"]["state"] == "lagging"
            assert ready.json()["replica"]["lag_seconds"] > 0.5
            summary = await app.client.get("/health")
            assert summary.status_code == 200
            assert summary.json()["replica"]["state"] == "lagging"

            # Token-less: fresh, because the primary serves it while the replica lags.
            primary_mark = migrated.primary_log.mark()
            read = await app.client.get(created.headers["Location"], headers=app.headers)
            assert read.status_code == 200
            task_id = created.json()["id"]
            assert ran_on(
                migrated.primary_log.statements_since(primary_mark), app, "primary", task_id
            )
            assert app.reads("primary", "lagging") >= 1

        await eventually(_state_is(app, ReplicaState.STREAMING), what="streaming again")
        assert app.gauge("db_replica_lag_seconds") == 0
        replica_mark = migrated.replica_log.mark()
        read = await app.client.get(created.headers["Location"], headers=app.headers)
        assert read.status_code == 200
        assert ran_on(migrated.replica_log.statements_since(replica_mark), app, "replica", task_id)
        ready = await app.client.get("/health/ready")
        assert ready.json()["replica"] == {"state": "streaming", "lag_seconds": 0.0}


async def test_replica_stopped_under_load_costs_no_5xx_and_reads_come_back(
    migrated: ReplicatedPostgres,
) -> None:
    async with app_on(migrated, database_read_lag_poll_seconds=0.2) as app:
        created = await app.client.post("/v1/tasks", json={"title": "load"}, headers=app.headers)
        url = created.headers["Location"]
        migrated.wait_caught_up()
        statuses: list[int] = []
        stop = asyncio.Event()

        async def reader() -> None:
            while not stop.is_set():
                for path in (url, "/v1/tasks"):
                    response = await app.client.get(path, headers=app.headers)
                    statuses.append(response.status_code)

        readers = [asyncio.create_task(reader()) for _ in range(4)]
        try:
            await eventually(_count_at_least(app, "replica", 20), what="reads on the replica")
            with migrated.replica_stopped():
                await eventually(_state_is(app, ReplicaState.UNAVAILABLE), what="unavailable")
                on_primary = app.reads("primary")
                await eventually(
                    _count_at_least(app, "primary", on_primary + 20),
                    what="reads served by the primary",
                )
                assert app.gauge("db_replica_up") == 0
                ready = await app.client.get("/health/ready")
                assert ready.status_code == 200
                assert ready.json()["replica"]["state"] == "unavailable"
            # Back, without restarting anything.
            await eventually(_state_is(app, ReplicaState.STREAMING), what="streaming again")
            on_replica = app.reads("replica")
            await eventually(
                _count_at_least(app, "replica", on_replica + 20), what="reads back on the replica"
            )
        finally:
            stop.set()
            await asyncio.gather(*readers)
        assert statuses
        assert set(statuses) == {200}, sorted(set(statuses))
        assert app.gauge("db_replica_up") == 1


def _count_at_least(app: App, target: str, count: float) -> Any:
    async def probe() -> bool:
        return app.reads(target) >= count

    return probe


async def test_a_malformed_token_is_a_422(migrated: ReplicatedPostgres) -> None:
    async with app_on(migrated) as app:
        response = await app.client.get("/v1/tasks", headers={**app.headers, TOKEN: "latest"})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"][0]["pointer"] == "#/header/Consistency-Token"
