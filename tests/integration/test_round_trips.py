"""What each request costs the database, counted on the wire (deterministic, no stopwatch).

The app talks to the real PostgreSQL through ``pgwire.WireTap``, which counts the round trips
(a ``Sync``/``Query``/``Flush`` the client waits on), the statements executed and the
statements prepared again. Each request is made once to warm the key cache, the pool and the
statement cache, then counted. These are the figures that keep the hot path fast: a change that
adds a round trip or defeats the statement cache fails here, whatever the machine's speed.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import httpx
import pytest
from pgwire import WireCounts, WireTap
from sqlalchemy import Engine, Pool, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import ORMExecuteState, Session

from appkit import serving
from service.settings import Settings

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
async def tapped(
    database_url: str, make_settings: Callable[..., Settings]
) -> AsyncIterator[tuple[httpx.AsyncClient, WireCounts]]:
    url = make_url(database_url)
    async with WireTap(url.host or "127.0.0.1", url.port or 5432) as tap:
        tapped_url = url.set(host="127.0.0.1", port=tap.port).render_as_string(hide_password=False)
        # One pooled connection: every counted request finds it open and its cache warm. The
        # key cache outlives the test: a refresh in the middle of a counted request (a slow
        # machine) would add its statement to that request's count.
        settings = make_settings(
            database_url=tapped_url, sqlalchemy_pool_size=1, api_key_cache_ttl_seconds=3600
        )
        async with serving(settings) as served:
            yield served.client, tap.counts


async def counted(
    counts: WireCounts, request: Callable[[], Awaitable[httpx.Response]], status: int
) -> WireCounts:
    counts.reset()
    response = await request()
    assert response.status_code == status, response.text
    return WireCounts(counts.round_trips, counts.parses, list(counts.statements))


def verbs(counts: WireCounts) -> list[str]:
    return [statement.split(None, 1)[0].rstrip(";").upper() for statement in counts.statements]


async def test_reads_are_one_round_trip_from_the_statement_cache(tapped: Any, credential) -> None:
    client, counts = tapped
    headers = credential.headers
    created = await client.post("/v1/tasks", json={"title": "read me"}, headers=headers)
    task_id = created.json()["id"]

    reads = [(f"/v1/tasks/{task_id}", 200), ("/v1/tasks?limit=20", 200)]
    reads += [(f"/v1/tasks/{uuid.uuid4()}", 404)]
    for path, status in reads:
        await client.get(path, headers=headers)  # warm: key cache, pool, statement cache
        seen = await counted(counts, partial(client.get, path, headers=headers), status)
        # One SELECT, no BEGIN/COMMIT around it, served from the driver's statement cache.
        assert verbs(seen) == ["SELECT"], (path, seen.statements)
        assert seen.round_trips == 1, (path, seen)
        assert seen.parses == 0, (path, seen)


async def test_a_warm_api_key_costs_nothing_on_the_wire(tapped: Any, credential) -> None:
    client, counts = tapped
    await client.get("/v1/tasks?limit=1", headers=credential.headers)
    seen = await counted(
        counts, lambda: client.get("/v1/tasks?limit=1", headers=credential.headers), 200
    )
    assert not any("api_keys" in statement for statement in seen.statements), seen.statements


async def _without_the_purge(count: Callable[[], Awaitable[WireCounts]]) -> WireCounts:
    """A count of a request that did not also purge expired idempotency records: about one
    stored record in 100 deletes a batch of them, one more statement (chance, not cost of the
    request; ``IdempotencyStore.purge_sometimes``). Three tries: a one-in-a-million miss."""
    for _ in range(3):
        seen = await count()
        if not any(s.startswith("DELETE FROM idempotency_keys") for s in seen.statements):
            return seen
    raise AssertionError("purged three times in a row")


async def test_writes_are_one_transaction_with_the_fewest_round_trips(
    tapped: Any, credential
) -> None:
    client, counts = tapped
    headers = credential.headers
    for _ in range(2):  # the second pass is counted: statement cache warm
        create = await counted(
            counts, lambda: client.post("/v1/tasks", json={"title": "t"}, headers=headers), 201
        )
        task_id = (await client.post("/v1/tasks", json={"title": "u"}, headers=headers)).json()[
            "id"
        ]
        idempotent = await _without_the_purge(
            lambda: counted(
                counts,
                lambda: client.post(
                    "/v1/tasks",
                    json={"title": "i"},
                    headers={**headers, "Idempotency-Key": str(uuid.uuid4())},
                ),
                201,
            )
        )
        patch = await counted(
            counts,
            partial(
                client.patch,
                f"/v1/tasks/{task_id}",
                json={"status": "done"},
                headers={**headers, "If-Match": '"1"'},
            ),
            200,
        )
        delete = await counted(
            counts,
            partial(client.delete, f"/v1/tasks/{task_id}", headers={**headers, "If-Match": '"2"'}),
            204,
        )
    expected_plain = ["BEGIN", "INSERT", "COMMIT"]
    assert verbs(create) == expected_plain, create.statements
    assert create.round_trips == 3, create
    assert verbs(patch) == ["BEGIN", "UPDATE", "COMMIT"], patch.statements
    assert patch.round_trips == 3, patch
    assert verbs(delete) == ["BEGIN", "DELETE", "COMMIT"], delete.statements
    assert delete.round_trips == 3, delete
    # Claim the key (a transaction-scoped advisory lock), look for a stored response, insert
    # the task and store the response: one statement, in the task's one transaction.
    assert verbs(idempotent) == ["BEGIN", "WITH", "COMMIT"], idempotent.statements
    claim_and_create = idempotent.statements[1]
    for step in (
        "pg_try_advisory_xact_lock",
        "FROM idempotency_keys",
        "INSERT INTO tasks",
        "INSERT INTO idempotency_keys",
    ):
        assert step in claim_and_create, (step, claim_and_create)
    assert idempotent.round_trips == 3, idempotent
    for seen in (create, idempotent, patch, delete):
        assert seen.parses == 0, seen


async def test_the_request_path_opens_no_orm_session(
    tapped: Any, credential, make_credential: Callable[..., Awaitable[Any]]
) -> None:
    """Reads and writes run on the driver connection: an ORM execution on either path is a
    regression (the ORM session, its events and result processing were most
    of a read's CPU and ~15 % of a write's)."""
    client, _ = tapped
    created = await client.post("/v1/tasks", json={"title": "orm"}, headers=credential.headers)
    task = f"/v1/tasks/{created.json()['id']}"
    newcomer = await make_credential()
    orm_statements: list[str] = []

    def record(state: ORMExecuteState) -> None:
        orm_statements.append(str(state.statement))

    event.listen(Session, "do_orm_execute", record)
    try:
        for path in (task, "/v1/tasks?limit=5&sort=-due_at"):
            response = await client.get(path, headers=credential.headers)
            assert response.status_code == 200, response.text
        headers = {**credential.headers, "Idempotency-Key": uuid.uuid4().hex}
        response = await client.post("/v1/tasks", json={"title": "orm 2"}, headers=headers)
        assert response.status_code == 201, response.text
        response = await client.patch(task, json={"title": "orm 3"}, headers=credential.headers)
        assert response.status_code == 200, response.text
        response = await client.delete(task, headers=credential.headers)
        assert response.status_code == 204, response.text
        assert orm_statements == []
        # The same listener sees a key the cache has never met looked up through the ORM
        # (api_keys.py keeps its session): it is listening.
        response = await client.get("/v1/tasks?limit=1", headers=newcomer.headers)
        assert response.status_code == 200, response.text
    finally:
        event.remove(Session, "do_orm_execute", record)
    assert orm_statements, "the listener saw nothing: the check above proves nothing"


async def test_requests_check_out_the_pool_without_an_engine_connection(
    tapped: Any, credential: Any, make_credential: Callable[..., Awaitable[Any]]
) -> None:
    """Reads and writes borrow one pooled connection each and build nothing around it:
    SQLAlchemy's ``Connection`` (its set-up, events and tear-down) was a sixth of a read's CPU
    and a third of a create's, for a layer the driver-level statements never used."""
    client, _ = tapped
    created = await client.post("/v1/tasks", json={"title": "pool"}, headers=credential.headers)
    task = f"/v1/tasks/{created.json()['id']}"
    newcomer = await make_credential()
    connections: list[object] = []
    checkouts: list[object] = []

    def on_connection(connection: Any) -> None:
        connections.append(connection)

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        checkouts.append(record)

    event.listen(Engine, "engine_connect", on_connection)
    event.listen(Pool, "checkout", on_checkout)
    try:
        requests = [
            client.get(task, headers=credential.headers),
            client.get("/v1/tasks?limit=5", headers=credential.headers),
            client.post("/v1/tasks", json={"title": "pool 2"}, headers=credential.headers),
            client.post(
                "/v1/tasks",
                json={"title": "pool 3"},
                headers={**credential.headers, "Idempotency-Key": str(uuid.uuid4())},
            ),
            client.patch(task, json={"title": "pool 4"}, headers=credential.headers),
            client.delete(task, headers=credential.headers),
        ]
        for request in requests:
            response = await request
            assert response.status_code < 300, response.text
        assert connections == []
        assert len(checkouts) == len(requests)
        # The same listeners see the session that looks up a key the cache has never met
        # (api_keys.py keeps it): they are listening.
        response = await client.get("/v1/tasks?limit=1", headers=newcomer.headers)
        assert response.status_code == 200, response.text
        assert len(connections) == 1
    finally:
        event.remove(Engine, "engine_connect", on_connection)
        event.remove(Pool, "checkout", on_checkout)
