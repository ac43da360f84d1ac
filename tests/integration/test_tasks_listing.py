"""``GET /v1/tasks``: every sort order (with ties and tasks without a due date), every filter,
keyset paging through small pages, and cursors that do not belong to the query."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from taskskit import EPOCH, assert_problem, insert_tasks, list_all

from service.db import Database
from service.tasks.models import PRIORITY_RANK, TaskPriority

# Deliberate ties: tasks 0-2 share created_at, tasks 3 and 4 share due_at, some have no due_at.
SEED: list[dict[str, Any]] = [
    {"title": "Alpha 100%", "created_at": EPOCH, "due_at": EPOCH + timedelta(days=3),
     "priority": "low", "status": "todo", "tags": ["home"]},
    {"title": "beta_one", "created_at": EPOCH, "due_at": None,
     "priority": "urgent", "status": "done", "tags": ["work", "home"]},
    {"title": "Gamma", "created_at": EPOCH, "due_at": EPOCH + timedelta(days=1),
     "priority": "urgent", "status": "in_progress", "tags": []},
    {"title": "delta ALPHA", "created_at": EPOCH + timedelta(hours=1),
     "due_at": EPOCH + timedelta(days=2), "priority": "normal", "status": "todo",
     "tags": ["work"]},
    {"title": "epsilon", "created_at": EPOCH + timedelta(hours=2),
     "due_at": EPOCH + timedelta(days=2), "priority": "high", "status": "done", "tags": []},
    {"title": "zeta", "created_at": EPOCH + timedelta(hours=3), "due_at": None,
     "priority": "normal", "status": "todo", "tags": ["home"]},
    {"title": "eta", "created_at": EPOCH + timedelta(hours=4), "due_at": None,
     "priority": "low", "status": "in_progress", "tags": ["work"]},
    {"title": "theta", "created_at": EPOCH + timedelta(hours=5),
     "due_at": EPOCH - timedelta(days=1), "priority": "high", "status": "todo", "tags": []},
]  # fmt: skip


@pytest.fixture
async def seeded(credential, database: Database) -> list[dict[str, Any]]:
    ids = await insert_tasks(database, credential.owner_id, SEED)
    return [{**row, "id": str(task_id)} for row, task_id in zip(SEED, ids, strict=True)]


def _expected(rows: list[dict[str, Any]], sort: str) -> list[str]:
    """The documented order, computed independently of the SQL."""

    # uuid.UUID orders like PostgreSQL's uuid type (bytewise).
    def uid(row: dict[str, Any]) -> uuid.UUID:
        return uuid.UUID(row["id"])

    if sort == "created_at":
        ordered = sorted(rows, key=lambda r: (r["created_at"], uid(r)))
    elif sort == "-created_at":
        ordered = sorted(rows, key=lambda r: (r["created_at"], uid(r)), reverse=True)
    elif sort == "priority":
        ordered = sorted(
            rows,
            key=lambda r: (PRIORITY_RANK[TaskPriority(r["priority"])], r["created_at"], uid(r)),
            reverse=True,
        )
    else:
        dated = [r for r in rows if r["due_at"] is not None]
        undated = [r for r in rows if r["due_at"] is None]
        descending = sort == "-due_at"
        ordered = sorted(dated, key=lambda r: (r["due_at"], uid(r)), reverse=descending)
        ordered += sorted(undated, key=uid, reverse=descending)
    return [row["id"] for row in ordered]


@pytest.mark.parametrize("sort", ["created_at", "-created_at", "due_at", "-due_at", "priority"])
@pytest.mark.parametrize("limit", [1, 3, 100])
async def test_sort_orders_and_paging(
    client: httpx.AsyncClient, credential, seeded: list[dict[str, Any]], sort: str, limit: int
) -> None:
    items = await list_all(client, credential.headers, sort=sort, limit=limit)
    assert [item["id"] for item in items] == _expected(seeded, sort)


async def test_default_is_newest_first_twenty(
    client: httpx.AsyncClient, credential, database: Database
) -> None:
    rows = [{"created_at": EPOCH + timedelta(minutes=n)} for n in range(25)]
    ids = await insert_tasks(database, credential.owner_id, rows)
    page = (await client.get("/v1/tasks", headers=credential.headers)).json()
    assert [item["id"] for item in page["items"]] == [str(i) for i in reversed(ids)][:20]
    assert page["next_cursor"]
    last = (
        await client.get(
            "/v1/tasks", params={"cursor": page["next_cursor"]}, headers=credential.headers
        )
    ).json()
    assert [item["id"] for item in last["items"]] == [str(i) for i in reversed(ids)][20:]
    assert last["next_cursor"] is None


async def test_empty_list(client: httpx.AsyncClient, credential) -> None:
    response = await client.get("/v1/tasks", headers=credential.headers)
    assert response.status_code == 200
    assert response.json() == {"items": [], "next_cursor": None}


async def test_exactly_one_full_page_has_no_next_cursor(
    client: httpx.AsyncClient, credential, database: Database
) -> None:
    await insert_tasks(database, credential.owner_id, [{}, {}, {}])
    page = (await client.get("/v1/tasks", params={"limit": 3}, headers=credential.headers)).json()
    assert len(page["items"]) == 3
    assert page["next_cursor"] is None


def _titles(items: list[dict[str, Any]]) -> set[str]:
    return {item["title"] for item in items}


@pytest.mark.parametrize(
    ("params", "titles"),
    [
        ({"status": "todo"}, {"Alpha 100%", "delta ALPHA", "zeta", "theta"}),
        ({"status": "done"}, {"beta_one", "epsilon"}),
        ({"priority": "urgent"}, {"beta_one", "Gamma"}),
        ({"priority": "low", "status": "in_progress"}, {"eta"}),
        ({"tag": "home"}, {"Alpha 100%", "beta_one", "zeta"}),
        ({"tag": "work", "status": "todo"}, {"delta ALPHA"}),
        ({"tag": "hom"}, set()),  # whole tags only
        ({"q": "alpha"}, {"Alpha 100%", "delta ALPHA"}),  # case-insensitive substring
        ({"q": "100%"}, {"Alpha 100%"}),  # % is literal, not a wildcard
        ({"q": "%"}, {"Alpha 100%"}),
        ({"q": "e_a"}, set()),  # _ is literal too: "eta" would match a wildcard
        ({"q": "a_one"}, {"beta_one"}),
        ({"q": "\\"}, set()),
        ({"due_before": "2030-01-03T00:00:00Z"}, {"Gamma", "theta"}),
        ({"due_after": "2030-01-03T00:00:00Z"}, {"Alpha 100%", "delta ALPHA", "epsilon"}),
        (
            {"due_after": "2030-01-02T00:00:00Z", "due_before": "2030-01-03T00:00:01+00:00"},
            {"Gamma", "delta ALPHA", "epsilon"},
        ),
        # The same instant written with an offset.
        ({"due_before": "2030-01-02T01:00:00+01:00"}, {"theta"}),
    ],
)
@pytest.mark.parametrize("sort", ["-created_at", "due_at", "-due_at", "priority"])
async def test_filters(
    client: httpx.AsyncClient,
    credential,
    seeded: list[dict[str, Any]],
    params: dict[str, str],
    titles: set[str],
    sort: str,
) -> None:
    # due_after is inclusive, due_before exclusive; tasks without a due date match neither.
    items = await list_all(client, credential.headers, sort=sort, limit=2, **params)
    assert _titles(items) == titles
    expected = [i for i in _expected(seeded, sort) if i in {t["id"] for t in items}]
    assert [item["id"] for item in items] == expected


async def test_due_window_shifted_by_an_offset(
    client: httpx.AsyncClient, credential, seeded: list[dict[str, Any]]
) -> None:
    # 2030-01-02T00:00Z is 2030-01-02T05:00+05:00: Gamma is due exactly then (inclusive).
    items = await list_all(
        client,
        credential.headers,
        due_after="2030-01-02T05:00:00+05:00",
        due_before="2030-01-02T00:00:01Z",
    )
    assert _titles(items) == {"Gamma"}


def _cursor(client_page: dict[str, Any]) -> str:
    cursor = client_page["next_cursor"]
    assert cursor
    return str(cursor)


def _b64(document: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()


async def test_cursors_that_do_not_belong_are_400(
    client: httpx.AsyncClient, credential, seeded: list[dict[str, Any]]
) -> None:
    headers = credential.headers
    first = (
        await client.get("/v1/tasks", params={"limit": 2, "status": "todo"}, headers=headers)
    ).json()
    cursor = _cursor(first)
    # The same cursor with its own query works...
    ok = await client.get(
        "/v1/tasks", params={"limit": 2, "status": "todo", "cursor": cursor}, headers=headers
    )
    assert ok.status_code == 200
    # ...a different limit is fine too (the page size is not part of the position)...
    ok = await client.get(
        "/v1/tasks", params={"limit": 5, "status": "todo", "cursor": cursor}, headers=headers
    )
    assert ok.status_code == 200
    # ...but not with another sort or other filters.
    for params in (
        {"status": "todo", "sort": "created_at"},
        {"status": "done"},
        {},
        {"status": "todo", "q": "a"},
    ):
        response = await client.get(
            "/v1/tasks", params={**params, "cursor": cursor}, headers=headers
        )
        assert_problem(response, 400, "invalid-cursor")

    document = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    tampered = [
        "not base64 at all!",
        "e30",  # {}
        _b64([1, 2]),
        _b64({**document, "v": 2}),
        _b64({**document, "k": document["k"][:1]}),
        _b64({**document, "k": ["yesterday", document["k"][1]]}),
        _b64({**document, "k": [document["k"][0], "not-a-uuid"]}),
        _b64({**document, "k": ["2030-01-01T00:00:00", document["k"][1]]}),  # naive
        _b64({**document, "k": [None, document["k"][1]]}),  # created_at is never null
        _b64({**document, "k": [12, document["k"][1]]}),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ]
    for token in tampered:
        response = await client.get(
            "/v1/tasks", params={"limit": 2, "status": "todo", "cursor": token}, headers=headers
        )
        assert_problem(response, 400, "invalid-cursor")


async def test_priority_cursor_with_an_impossible_rank_is_400(
    client: httpx.AsyncClient, credential, seeded: list[dict[str, Any]]
) -> None:
    page = (
        await client.get(
            "/v1/tasks", params={"sort": "priority", "limit": 1}, headers=credential.headers
        )
    ).json()
    cursor = _cursor(page)
    document = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    for rank in (7, -1, "3", True, 2**40):
        token = _b64({**document, "k": [rank, *document["k"][1:]]})
        response = await client.get(
            "/v1/tasks",
            params={"sort": "priority", "cursor": token},
            headers=credential.headers,
        )
        assert_problem(response, 400, "invalid-cursor")
