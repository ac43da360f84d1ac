"""Read-your-writes through the real stack: Nginx -> 2 instances -> PgBouncer -> primary + replica.

The consistency token is the client's to carry, so it must hold across instances (Nginx
round-robins every request) and across PgBouncer's transaction pooling (the token check and the
read share one transaction, hence one server connection). Replay on the replica is paused, so a
read that reached the replica without honouring the token would be a 404.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from conftest import STACK_NGINX_ENV, require_stack_binaries
from prometheus_client.parser import text_string_to_metric_families

from service.replica import parse_lsn
from testkit import wait_until
from tools.stack import Stack

pytestmark = pytest.mark.stack

ORIGIN = "https://app.example"
TOKEN = "Consistency-Token"


@pytest.fixture(scope="module")
def replica_stack() -> Iterator[Stack]:
    require_stack_binaries()
    with Stack(
        app_instances=2,
        workers=1,
        replica=True,
        app_env={
            "RATE_LIMIT_ENABLED": "false",
            # Paused replay must not turn into "lagging" (reads to the primary) during the test:
            # the token-less reads below are meant to reach the stale replica.
            "DATABASE_READ_MAX_LAG_SECONDS": "600",
            "DATABASE_READ_LAG_POLL_SECONDS": "0.2",
            "CORS_ORIGINS": ORIGIN,
        },
        nginx_env=STACK_NGINX_ENV,
    ) as stack:
        yield stack


def _reads(stack: Stack, index: int) -> dict[tuple[str, str], float]:
    text = httpx.get(stack.instances[index].metrics_url, timeout=5).text
    return {
        (sample.labels["target"], sample.labels["reason"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "db_reads_total"
    }


def _replica_caught_up(stack: Stack) -> bool:
    assert stack.postgres is not None
    assert stack.replica_server is not None
    target = parse_lsn(stack.postgres.psql("SELECT pg_current_wal_flush_lsn()"))
    replayed = stack.replica_server.psql("SELECT pg_last_wal_replay_lsn()")
    return bool(replayed) and parse_lsn(replayed) >= target


def _streaming(stack: Stack) -> bool:
    states = [
        httpx.get(f"{instance.url}/health/ready", timeout=5).json().get("replica", {}).get("state")
        for instance in stack.instances
    ]
    return states == ["streaming", "streaming"]


def test_own_writes_are_read_back_on_any_instance_while_replay_is_paused(
    replica_stack: Stack,
) -> None:
    stack = replica_stack
    replica = stack.replica_server
    assert replica is not None
    wait_until(
        lambda: _streaming(stack), timeout=30.0, what="both instances see the replica streaming"
    )
    headers = stack.headers
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        before = client.post("/v1/tasks", json={"title": "before"}, headers=headers)
        assert before.status_code == 201
        wait_until(lambda: _replica_caught_up(stack), timeout=30.0, what="replica caught up")
        # Caught up: a token-less read is served by the replica, through PgBouncer.
        assert client.get(before.headers["Location"], headers=headers).status_code == 200

        replica.psql("SELECT pg_wal_replay_pause()")
        try:
            wait_until(
                lambda: replica.psql("SELECT pg_get_wal_replay_pause_state()") == "paused",
                timeout=30.0,
                what="replay paused",
            )
            for n in range(12):
                created = client.post("/v1/tasks", json={"title": f"paused {n}"}, headers=headers)
                assert created.status_code == 201, created.text
                token = created.headers[TOKEN]
                # Every read with the token: 200, whichever instance Nginx picks.
                for _ in range(2):
                    read = client.get(
                        created.headers["Location"], headers={**headers, TOKEN: token}
                    )
                    assert read.status_code == 200, read.text
                    assert read.json()["title"] == f"paused {n}"
            # Without the token: the replica's past (the write is not there yet).
            stale = client.get(created.headers["Location"], headers=headers)
            assert stale.status_code == 404
            # Both instances honoured tokens the replica had not reached by asking the primary.
            for index in (0, 1):
                assert _reads(stack, index).get(("primary", "behind-token"), 0) >= 1, index
        finally:
            replica.psql("SELECT pg_wal_replay_resume()")
        wait_until(lambda: _replica_caught_up(stack), timeout=30.0, what="replica caught up again")
        fresh = client.get(created.headers["Location"], headers=headers)
        assert fresh.status_code == 200


def test_browsers_can_read_and_send_the_token(replica_stack: Stack) -> None:
    stack = replica_stack
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        created = client.post(
            "/v1/tasks",
            json={"title": f"cors {uuid.uuid4().hex[:6]}"},
            headers={**stack.headers, "Origin": ORIGIN},
        )
        assert created.status_code == 201
        assert created.headers[TOKEN]
        exposed = created.headers["Access-Control-Expose-Headers"]
        assert TOKEN in [name.strip() for name in exposed.split(",")]
        preflight = client.options(
            "/v1/tasks",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "consistency-token,x-api-key",
            },
        )
        assert preflight.status_code == 200
        allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
        assert "consistency-token" in allowed
