"""What an attacker would send, by class: sizes and counts, encodings, ranges, headers, redirects,
configuration.

Every request field, header and query parameter has a bound; each is stated in ``BOUNDS`` and
tested one past it. Whatever the input, the answer is never a 5xx and never grows with the
input: ``assert_refused`` checks the status, the problem+json shape and a size cap on every
refusal. (How long the event loop is held by a maximal body is measured, not asserted:
``python -m tools.bench.adversarial`` prints it; docs/security.md quotes the figures.)

The numbered findings of issue 9 each have a test here, named in its docstring, except those that
need real processes: the request id through nginx (tests/stack/test_request_id_nginx.py),
``make run`` with DATABASE_URL (tests/stack/test_make_run.py) and the migrate command's JSON logs
(tests/integration/test_migrations.py).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from starlette.requests import Request
from taskskit import count_tasks, insert_tasks
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from service.db import Database
from service.errors import is_connection_error
from service.http.handlers import MAX_LISTED_ERRORS
from service.http.problems import unexpected_error_response
from service.middleware.access_log import MAX_LOGGED_PATH, logged_path
from service.middleware.request_limits import MAX_HEADER_BYTES, MAX_TARGET_BYTES
from service.security.api_keys import MAX_KEY_LENGTH
from service.security.models import ApiKey
from service.settings import Settings
from service.tasks.etag import MAX_ENTITY_TAGS
from service.tasks.models import Task
from service.tasks.schemas import TAGS_MAX, UNKNOWN_FIELDS_LISTED
from testkit import service_cli

ROOT = Path(__file__).resolve().parents[2]
AppClient = Callable[[Settings], Any]
MakeCredential = Callable[..., Awaitable[Any]]

# No refusal may be larger than this, whatever was sent.
MAX_PROBLEM_BYTES = 8 * 1024
JSON_HEADERS = {"Content-Type": "application/json"}
MISSING_TASK = "/v1/tasks/0b6f8a4e-8f0e-4a4e-9c55-7b8f7c7f0c11"


def assert_refused(
    response: httpx.Response, status: int, slug: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"] == "application/problem+json"
    assert len(response.content) <= MAX_PROBLEM_BYTES, len(response.content)
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["request_id"] == response.headers["x-request-id"]
    if slug is not None:
        assert body["type"].endswith("/" + slug), body["type"]
    return body


async def task_of(client: httpx.AsyncClient, credential: Any, **fields: Any) -> dict[str, Any]:
    response = await client.post(
        "/v1/tasks", json={"title": "t", **fields}, headers=credential.headers
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


# --- the table of bounds ----------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """One client-controlled input, its bound, and a request one past it."""

    input: str
    bound: str
    method: str
    path: str
    status: int
    slug: str | None = None
    json: Any = None
    content: bytes | None = None
    params: dict[str, str] | None = None
    headers: dict[str, str] | None = None


LONG_TAGS = ", ".join(f'"{n}"' for n in range(1, MAX_ENTITY_TAGS + 2))
BOUNDS = [
    # body fields (POST; PATCH shares the same types)
    Bound("title", "1-200 characters", "POST", "/v1/tasks", 422, json={"title": "x" * 201}),
    Bound(
        "description",
        "up to 10,000 characters",
        "POST",
        "/v1/tasks",
        422,
        json={"title": "t", "description": "x" * 10_001},
    ),
    Bound(
        "tags",
        "up to 20 items",
        "POST",
        "/v1/tasks",
        422,
        json={"title": "t", "tags": [f"t{n}" for n in range(TAGS_MAX + 1)]},
    ),
    Bound(
        "tags[]",
        "1-32 characters",
        "POST",
        "/v1/tasks",
        422,
        json={"title": "t", "tags": ["x" * 33]},
    ),
    Bound(
        "status",
        "todo|in_progress|done",
        "POST",
        "/v1/tasks",
        422,
        json={"title": "t", "status": "x"},
    ),
    Bound(
        "priority", "low..urgent", "POST", "/v1/tasks", 422, json={"title": "t", "priority": "x"}
    ),
    Bound(
        "due_at",
        "year 1900-9998",
        "POST",
        "/v1/tasks",
        422,
        json={"title": "t", "due_at": "9999-01-01T00:00:00Z"},
    ),
    Bound(
        "due_at",
        "year 1900-9998",
        "POST",
        "/v1/tasks",
        422,
        json={"title": "t", "due_at": "1899-12-31T23:59:59Z"},
    ),
    Bound(
        "unknown fields",
        "none (each a 422)",
        "POST",
        "/v1/tasks",
        422,
        json={"title": "t", "owner_id": str(uuid.uuid4())},
    ),
    Bound(
        "body",
        "MAX_REQUEST_BODY_BYTES (1 MiB)",
        "POST",
        "/v1/tasks",
        413,
        content=b" " * (1_048_576 + 1),
        headers=JSON_HEADERS,
    ),
    # query parameters (GET /v1/tasks)
    Bound("limit", "1-100", "GET", "/v1/tasks", 422, params={"limit": "101"}),
    Bound("limit", "1-100", "GET", "/v1/tasks", 422, params={"limit": "0"}),
    Bound("cursor", "up to 512 characters", "GET", "/v1/tasks", 422, params={"cursor": "x" * 513}),
    Bound("q", "1-200 characters", "GET", "/v1/tasks", 422, params={"q": "x" * 201}),
    Bound("tag", "1-32 characters", "GET", "/v1/tasks", 422, params={"tag": "x" * 33}),
    Bound("status", "todo|in_progress|done", "GET", "/v1/tasks", 422, params={"status": "x"}),
    Bound("priority", "low..urgent", "GET", "/v1/tasks", 422, params={"priority": "x"}),
    Bound("sort", "5 orders", "GET", "/v1/tasks", 422, params={"sort": "title"}),
    Bound(
        "due_before",
        "year 1900-9998",
        "GET",
        "/v1/tasks",
        422,
        params={"due_before": "9999-06-01T00:00:00Z"},
    ),
    Bound(
        "due_after",
        "year 1900-9998",
        "GET",
        "/v1/tasks",
        422,
        params={"due_after": "1066-10-14T09:00:00Z"},
    ),
    Bound(
        "path and query",
        f"{MAX_TARGET_BYTES} bytes",
        "GET",
        "/v1/tasks",
        414,
        params={"q": "x", "pad": "p" * MAX_TARGET_BYTES},
    ),
    # path
    Bound("task id", "a UUID (36 characters)", "GET", MISSING_TASK + "0", 404),
    # headers
    Bound(
        "If-Match",
        f"{MAX_ENTITY_TAGS} entity tags",
        "DELETE",
        MISSING_TASK,
        400,
        "too-many-entity-tags",
        headers={"If-Match": LONG_TAGS},
    ),
    Bound(
        "If-None-Match",
        f"{MAX_ENTITY_TAGS} entity tags",
        "GET",
        MISSING_TASK,
        400,
        "too-many-entity-tags",
        headers={"If-None-Match": LONG_TAGS},
    ),
    Bound(
        "Idempotency-Key",
        "1-255 printable ASCII",
        "POST",
        "/v1/tasks",
        422,
        json={"title": "t"},
        headers={"Idempotency-Key": "k" * 256},
    ),
    Bound(
        "Content-Type",
        "application/json, UTF-8",
        "POST",
        "/v1/tasks",
        415,
        content=b'{"title": "t"}',
        headers={"Content-Type": "application/json; charset=iso-8859-1"},
    ),
    Bound(
        "all headers",
        f"{MAX_HEADER_BYTES} bytes in total",
        "GET",
        "/v1/tasks",
        431,
        headers={f"X-Pad-{n}": "p" * 1024 for n in range(MAX_HEADER_BYTES // 1024)},
    ),
]


@pytest.mark.parametrize("bound", BOUNDS, ids=lambda b: f"{b.input}:{b.status}")
async def test_one_past_each_bound_is_a_small_problem(
    client: httpx.AsyncClient, credential: Any, database: Database, bound: Bound
) -> None:
    headers = {**credential.headers, **(bound.headers or {})}
    response = await client.request(
        bound.method,
        bound.path,
        json=bound.json,
        content=bound.content,
        params=bound.params,
        headers=headers,
    )
    assert_refused(response, bound.status, bound.slug)
    assert await count_tasks(database, credential.owner_id) == 0


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"limit": "100"}, 200),
        ({"q": "x" * 200, "tag": "t" * 32}, 200),
        ({"due_before": "9998-12-31T23:59:59Z", "due_after": "1900-01-01T00:00:00Z"}, 200),
    ],
)
async def test_query_parameters_at_their_bound_pass(
    client: httpx.AsyncClient, credential: Any, params: dict[str, str], status: int
) -> None:
    response = await client.get("/v1/tasks", params=params, headers=credential.headers)
    assert response.status_code == status, response.text


# --- sizes and counts -------------------------------------------------------------------------


async def test_a_flood_of_unknown_fields_is_one_small_error(
    client: httpx.AsyncClient, credential: Any, database: Database
) -> None:
    """Finding 1: 90,000 unknown fields were 90,000 errors (5.7 MiB) after 0.6-0.8 s."""
    body = "{" + ",".join(f'"k{n}":1' for n in range(90_000)) + ',"title":"x"}'
    assert len(body) < 1_048_576
    response = await client.post(
        "/v1/tasks", content=body, headers={**credential.headers, **JSON_HEADERS}
    )
    problem = assert_refused(response, 422, "validation-error")
    assert len(problem["errors"]) == 1
    assert "90000 fields are not part of the request" in problem["errors"][0]["detail"]
    assert await count_tasks(database, credential.owner_id) == 0


async def test_a_few_unknown_fields_each_get_their_pointer(
    client: httpx.AsyncClient, credential: Any
) -> None:
    body = {"title": "x", **{f"k{n}": n for n in range(UNKNOWN_FIELDS_LISTED)}}
    response = await client.post("/v1/tasks", json=body, headers=credential.headers)
    problem = assert_refused(response, 422)
    assert {e["pointer"] for e in problem["errors"]} == {
        f"#/k{n}" for n in range(UNKNOWN_FIELDS_LISTED)
    }


async def test_the_error_list_is_capped_and_says_how_many_were_left_out(
    client: httpx.AsyncClient, credential: Any
) -> None:
    # 5 invalid fields plus 20 invalid tags: 25 errors, one more than the list shows... five.
    body = {
        "title": "",
        "status": "x",
        "priority": "x",
        "due_at": "soon",
        "description": 7,
        "tags": [""] * TAGS_MAX,
    }
    response = await client.post("/v1/tasks", json=body, headers=credential.headers)
    problem = assert_refused(response, 422)
    assert len(problem["errors"]) == MAX_LISTED_ERRORS
    assert problem["detail"] == (
        f"The request has 25 invalid fields; errors lists the first {MAX_LISTED_ERRORS}, "
        "5 more were left out"
    )


async def test_a_huge_tag_list_is_one_error(client: httpx.AsyncClient, credential: Any) -> None:
    # 300,000 invalid tags fit in 1 MiB; they were 300,000 errors.
    body = b'{"title":"t","tags":[' + b",".join([b'""'] * 300_000) + b"]}"
    response = await client.post(
        "/v1/tasks", content=body, headers={**credential.headers, **JSON_HEADERS}
    )
    problem = assert_refused(response, 422)
    assert [e["pointer"] for e in problem["errors"]] == ["#/tags"]


@pytest.mark.parametrize("header", ["If-Match", "If-None-Match"])
async def test_at_most_the_entity_tag_bound_is_an_ordinary_precondition(
    client: httpx.AsyncClient, credential: Any, header: str
) -> None:
    task = await task_of(client, credential)
    tags = ", ".join(f'"{n}"' for n in range(2, MAX_ENTITY_TAGS + 2))  # 32 tags, none current
    method = "PATCH" if header == "If-Match" else "GET"
    response = await client.request(
        method,
        f"/v1/tasks/{task['id']}",
        content=b"{}",
        headers={
            **credential.headers,
            header: tags,
            "Content-Type": "application/merge-patch+json",
        },
    )
    assert response.status_code == (412 if header == "If-Match" else 200), response.text


@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
@pytest.mark.parametrize(("tags", "status"), [(33_000, 431), (3_000, 400)])
async def test_thousands_of_entity_tags_are_a_4xx_not_database_unavailable(
    client: httpx.AsyncClient, credential: Any, method: str, tags: int, status: int
) -> None:
    """Finding 2: 33,000 tags (246 KiB, past asyncpg's 32,767 bind parameters) were a 503
    database-unavailable. Now the header section's bound stops them (431) and, within it, the
    entity-tag bound (400)."""
    task = await task_of(client, credential)
    if_match = ",".join(f'"{n}"' for n in range(1, tags + 1))
    response = await client.request(
        method,
        f"/v1/tasks/{task['id']}",
        content=b'{"title": "changed"}',
        headers={
            **credential.headers,
            "If-Match": if_match,
            "Content-Type": "application/merge-patch+json",
        },
    )
    assert_refused(response, status, "too-many-entity-tags" if status == 400 else None)
    unchanged = await client.get(f"/v1/tasks/{task['id']}", headers=credential.headers)
    assert unchanged.json()["version"] == task["version"]


async def test_a_statement_error_from_the_driver_is_not_an_outage(database: Database) -> None:
    """Finding 2: the classification itself. asyncpg's InterfaceError for too many arguments
    was taken for a lost connection; a connection that really is lost still is one."""
    async with database.engine.connect() as connection:
        with pytest.raises(DBAPIError) as too_many:
            await connection.execute(select(Task.id).where(Task.version.in_(list(range(33_000)))))
    assert not is_connection_error(too_many.value)
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": [], "state": {}})
    assert unexpected_error_response(request, too_many.value).status_code == 500

    async with database.engine.connect() as connection:
        pid = await connection.scalar(text("SELECT pg_backend_pid()"))
        async with database.engine.connect() as other:
            await other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError) as lost:
            await connection.execute(text("SELECT 1"))
    assert is_connection_error(lost.value)
    assert unexpected_error_response(request, lost.value).status_code == 503


async def test_a_long_api_key_is_refused_before_any_lookup(
    client: httpx.AsyncClient, credential: Any
) -> None:
    forged = credential.key + "x" * (MAX_KEY_LENGTH - len(credential.key) + 1)
    response = await client.get("/v1/tasks", headers={"X-API-Key": forged})
    assert assert_refused(response, 401)["detail"] == "Malformed API key"


async def test_a_long_path_is_not_echoed(client: httpx.AsyncClient, credential: Any) -> None:
    response = await client.get("/v1/" + "a" * MAX_TARGET_BYTES, headers=credential.headers)
    problem = assert_refused(response, 414)
    assert "instance" not in problem
    long_404 = await client.get("/v1/" + "b" * 4000, headers=credential.headers)
    assert "instance" not in assert_refused(long_404, 404)


def test_the_access_log_does_not_grow_with_the_path() -> None:
    assert len(logged_path("/v1/" + "a" * MAX_TARGET_BYTES)) == MAX_LOGGED_PATH + 3
    assert logged_path("/v1/tasks") == "/v1/tasks"


# --- encodings --------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
async def test_json_in_another_encoding_is_415(
    client: httpx.AsyncClient, credential: Any, database: Database, encoding: str
) -> None:
    """Finding 4: a UTF-16 or UTF-32 body without a charset was parsed and stored (201)."""
    body = json.dumps({"title": "sneaky"}).encode(encoding)
    response = await client.post(
        "/v1/tasks", content=body, headers={**credential.headers, **JSON_HEADERS}
    )
    assert_refused(response, 415, "unsupported-media-type")
    assert response.headers["accept-post"] == "application/json"
    patch = await client.patch(
        MISSING_TASK,
        content=json.dumps({"title": "x"}).encode(encoding),
        headers={**credential.headers, "Content-Type": "application/merge-patch+json"},
    )
    assert_refused(patch, 415)
    assert await count_tasks(database, credential.owner_id) == 0


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"\xef\xbb\xbf" + b'{"title": "with a BOM"}', 201),  # RFC 8259 lets a parser ignore it
        (b'{"title": "caf\xe9"}', 400),  # Latin-1 bytes: not UTF-8
        (b'{"title": "\xed\xa0\x80"}', 422),  # an encoded surrogate: unstorable
        (b'{"title": ' + b"[" * 100_000, 400),  # not JSON
        (b'{"title": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),  # deeper than the parser
        (b'{"title": "t", "priority": ' + b"9" * 5000 + b"}", 400),  # past int digit limit
        (b'{"title": "t", "priority": 1e999999}', 422),  # infinity is no priority
        (b'{"title": "a\\u0000b"}', 422),
        (b'{"title": "\\ud800"}', 422),
    ],
)
async def test_encodings_and_shapes_of_json(
    client: httpx.AsyncClient, credential: Any, body: bytes, status: int
) -> None:
    response = await client.post(
        "/v1/tasks", content=body, headers={**credential.headers, **JSON_HEADERS}
    )
    if status == 201:
        assert response.status_code == 201, response.text
        assert response.json()["title"] == "with a BOM"
    else:
        assert_refused(response, status)


# --- ranges -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "due_at",
    [
        "9999-12-31T23:59:59.999999Z",  # was stored as PostgreSQL infinity
        "0001-01-01T00:00:00Z",  # was stored as -infinity
        "9999-01-01T00:00:00+05:00",
        "1899-12-31T23:59:59.999999Z",
        "0001-01-01T00:00:00+05:00",  # before year 1 in UTC
    ],
)
async def test_due_dates_out_of_range_are_422(
    client: httpx.AsyncClient, credential: Any, due_at: str
) -> None:
    """Finding 5: the extremes were stored as +-infinity and broke paging."""
    response = await client.post(
        "/v1/tasks", json={"title": "t", "due_at": due_at}, headers=credential.headers
    )
    problem = assert_refused(response, 422)
    assert [error["pointer"] for error in problem["errors"]] == ["#/due_at"]
    assert "year from 1900 to 9998" in problem["errors"][0]["detail"] or (
        "out of range" in problem["errors"][0]["detail"]
    )


async def test_the_extremes_of_the_range_round_trip_and_page(
    client: httpx.AsyncClient, credential: Any
) -> None:
    """Finding 5: every value the API accepts comes back in UTC with its "Z", and paging passes
    it in both directions."""
    extremes = {
        "1900-01-01T00:00:00+23:59": "1899-12-31T00:01:00Z",
        "9998-12-31T23:59:59.999999-23:59": "9999-01-01T23:58:59.999999Z",
        "2030-01-01T00:00:00Z": "2030-01-01T00:00:00Z",
    }
    created = {}
    for sent, expected in extremes.items():
        task = await task_of(client, credential, due_at=sent)
        assert task["due_at"] == expected
        created[task["id"]] = expected
    for sort in ("due_at", "-due_at"):
        seen: list[str] = []
        cursor = None
        while True:
            params = {"sort": sort, "limit": "1", **({"cursor": cursor} if cursor else {})}
            page = await client.get("/v1/tasks", params=params, headers=credential.headers)
            assert page.status_code == 200, page.text
            seen += [item["id"] for item in page.json()["items"]]
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(created)
        due = [created[i] for i in seen]
        assert due == sorted(due, reverse=sort.startswith("-"))


async def test_infinite_due_dates_stored_earlier_still_round_trip(
    client: httpx.AsyncClient, credential: Any, database: Database
) -> None:
    """Finding 5, for rows stored before the range existed: PostgreSQL +-infinity reads back
    with its "Z" and the owner can page past it."""
    ids = await insert_tasks(database, credential.owner_id, [{}, {}, {}])
    async for session in database.session():
        await session.execute(
            text("UPDATE tasks SET due_at = 'infinity' WHERE id = :id"), {"id": ids[0]}
        )
        await session.execute(
            text("UPDATE tasks SET due_at = '-infinity' WHERE id = :id"), {"id": ids[1]}
        )
    got = await client.get(f"/v1/tasks/{ids[0]}", headers=credential.headers)
    assert got.json()["due_at"] == "9999-12-31T23:59:59.999999Z"
    for sort in ("due_at", "-due_at"):
        seen: list[str] = []
        cursor = None
        for _ in range(5):
            params = {"sort": sort, "limit": "1", **({"cursor": cursor} if cursor else {})}
            page = await client.get("/v1/tasks", params=params, headers=credential.headers)
            assert page.status_code == 200, page.text
            seen += [item["id"] for item in page.json()["items"]]
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(str(i) for i in ids)


# --- headers ----------------------------------------------------------------------------------


async def test_failed_authentication_does_not_stamp_last_used(
    make_settings: Callable[..., Settings],
    app_client: AppClient,
    make_credential: MakeCredential,
    database: Database,
) -> None:
    """Finding 3: a wrong secret behind a real (public) prefix marked the key as used."""
    credential = await make_credential()
    forged = f"fa_{credential.prefix}_{'A' * 43}"

    async def last_used() -> Any:
        async with database.engine.connect() as connection:
            return await connection.scalar(
                select(ApiKey.last_used_at).where(ApiKey.prefix == credential.prefix)
            )

    async with app_client(make_settings(api_key_cache_ttl_seconds=60)) as client:
        for _ in range(3):
            refused = await client.get("/v1/tasks", headers={"X-API-Key": forged})
            assert_refused(refused, 401)
        assert await last_used() is None
        # The entry the forged request cached is used by the real key, which then stamps it.
        assert (await client.get("/v1/tasks", headers=credential.headers)).status_code == 200
        stamped = await last_used()
        assert stamped is not None
        assert (await client.get("/v1/tasks", headers=credential.headers)).status_code == 200
        assert await last_used() == stamped, "stamped once per cache refresh, not per request"


async def test_revoked_or_expired_keys_are_not_stamped(
    make_settings: Callable[..., Settings],
    app_client: AppClient,
    make_credential: MakeCredential,
    database: Database,
) -> None:
    expired = await make_credential(expires_at=datetime.now(UTC) - timedelta(minutes=1))
    async with app_client(make_settings()) as client:
        assert_refused(await client.get("/v1/tasks", headers=expired.headers), 401)
    async for session in database.session():
        stamped = await session.scalar(
            select(func.count()).where(
                ApiKey.prefix == expired.prefix, ApiKey.last_used_at.is_not(None)
            )
        )
    assert stamped == 0


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("abc", False),  # too short
        ("a" * 129, False),  # too long
        ("req:2030-01-01:42", True),  # colons are allowed
        ("has space in it", False),
        ('x"}, "level": "critical', False),  # would forge a log field
        ("0123456789abcdef", True),
    ],
)
async def test_request_id_rule(client: httpx.AsyncClient, sent: str, kept: bool) -> None:
    """Finding 6 (the app's half; tests/stack/test_request_id_nginx.py runs it through nginx):
    header, body and logs carry the same id, the client's only when it follows the rule."""
    response = await client.get("/nope", headers={"X-Request-ID": sent})
    body = assert_refused(response, 404)
    assert body["request_id"] == response.headers["x-request-id"]
    assert (body["request_id"] == sent) is kept


async def test_cors_refusal_is_problem_json(
    make_settings: Callable[..., Settings], app_client: AppClient
) -> None:
    """Finding 10: Starlette's refused preflight was 400 text/plain."""
    async with app_client(make_settings(cors_origins="https://app.example.com")) as client:
        for headers in (
            {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
            {"Origin": "https://app.example.com", "Access-Control-Request-Method": "PUT"},
            {
                "Origin": "https://app.example.com",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "x-evil",
            },
        ):
            response = await client.options("/v1/tasks", headers=headers)
            body = assert_refused(response, 400, "cors-refused")
            assert body["detail"].startswith("Disallowed CORS")
            if headers["Origin"] == "https://evil.example":
                assert "access-control-allow-origin" not in response.headers


# --- redirects --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/tasks/"),
        ("POST", "/v1/tasks/"),
        ("GET", f"{MISSING_TASK}/"),
        ("GET", "/health/live/"),
        ("GET", "/docs/"),
        ("GET", "/v1/tasks/?limit=5"),
    ],
)
async def test_no_redirect_is_built_from_the_host_header(
    client: httpx.AsyncClient, credential: Any, method: str, path: str
) -> None:
    """Finding 7: /v1/tasks/ answered 307 Location: http://evil.example/v1/tasks."""
    response = await client.request(
        method, path, headers={**credential.headers, "Host": "evil.example"}
    )
    assert "location" not in response.headers
    assert_refused(response, 404, "not-found")


# --- configuration ----------------------------------------------------------------------------


def test_production_refuses_null_origin_and_sqlalchemy_echo(
    make_settings: Callable[..., Settings],
) -> None:
    """Finding 8."""
    production = {
        "environment": "production",
        "gateway_shared_secret": "g" * 40,
    }
    with pytest.raises(Exception, match="SQLALCHEMY_ECHO must be false in production"):
        make_settings(**production, sqlalchemy_echo=True)
    # "null" is refused everywhere, like "*": any sandboxed page sends Origin: null.
    for environment in ("production", "development"):
        with pytest.raises(Exception, match="'null' is not allowed"):
            make_settings(**{**production, "environment": environment}, cors_origins="null")
    with pytest.raises(Exception, match="scheme://host"):
        make_settings(cors_origins="https://app.example.com/")
    assert make_settings(environment="development", sqlalchemy_echo=True).sqlalchemy_echo


@pytest.mark.parametrize("days", ["0", "-5", "soon"])
async def test_create_api_key_refuses_non_positive_expiry(
    database_url: str, database: Database, days: str
) -> None:
    """Finding 9: 0 made a key that never expires, -5 one already expired; both exited 0."""
    owner = str(uuid.uuid4())
    result = service_cli(
        database_url, "create-api-key", "--owner", owner, f"--expires-in-days={days}"
    )
    assert result.returncode == 2, result
    assert "--expires-in-days" in result.stderr
    assert "fa_" not in result.stdout
    async for session in database.session():
        keys = await session.scalar(select(func.count()).where(ApiKey.owner_id == uuid.UUID(owner)))
    assert keys == 0


def _trusted_client(trusted: str, peer: str, forwarded_for: str) -> str:
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["client"] = scope["client"][0]

    middleware = ProxyHeadersMiddleware(app, trusted_hosts=trusted)
    scope = {
        "type": "http",
        "client": (peer, 5000),
        "headers": [(b"x-forwarded-for", forwarded_for.encode())],
    }
    asyncio.run(middleware(scope, None, None))  # type: ignore[arg-type]
    return str(seen["client"])


def _shipped_forwarded_allow_ips() -> dict[str, str]:
    values = yaml.safe_load((ROOT / "charts/fastapi-app/values.yaml").read_text())
    app_env = dict(
        line.split("=", 1)
        for line in (ROOT / "k8s/base/app.env").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    return {
        "chart": str(values["config"]["FORWARDED_ALLOW_IPS"]),
        "kustomize": app_env["FORWARDED_ALLOW_IPS"],
    }


@pytest.mark.parametrize("source", ["chart", "kustomize"])
def test_shipped_proxy_trust_never_takes_the_clients_own_entry(source: str) -> None:
    """Finding 12: with FORWARDED_ALLOW_IPS=* uvicorn took the left-most X-Forwarded-For, which
    the client writes when the ingress appends to it."""
    trusted = _shipped_forwarded_allow_ips()[source]
    assert trusted == _shipped_forwarded_allow_ips()["chart"], "chart and kustomize agree"
    assert "*" not in trusted
    # The ingress (a pod IP) appended the real client after what the client sent.
    assert _trusted_client(trusted, "10.42.0.7", "6.6.6.6, 203.0.113.9") == "203.0.113.9"
    assert _trusted_client(trusted, "10.42.0.7", "203.0.113.9") == "203.0.113.9"
    # A peer outside the trusted ranges cannot claim any address.
    assert _trusted_client(trusted, "198.51.100.1", "6.6.6.6") == "198.51.100.1"
    # What "*" did:
    assert _trusted_client("*", "10.42.0.7", "6.6.6.6, 203.0.113.9") == "6.6.6.6"
