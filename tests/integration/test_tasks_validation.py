"""Every validation rule of the Tasks API: 422 problem+json with JSON pointers to the field,
400 for malformed JSON or cursors, 415 for other media types."""

from __future__ import annotations

import httpx
import pytest
from taskskit import assert_problem, count_tasks, pointers

from service.db import Database

VALID = {"title": "valid"}


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({}, "#/title"),  # required
        ({"title": ""}, "#/title"),
        ({"title": "   \t\n "}, "#/title"),  # whitespace only
        ({"title": "x" * 201}, "#/title"),
        ({"title": " " + "x" * 200}, "#/title"),  # the limit applies to the text as sent
        ({"title": "\u00a0\u2003\ufeff"}, "#/title"),  # Unicode whitespace is blank too
        ({"title": 42}, "#/title"),
        ({"title": None}, "#/title"),
        ({"title": "nul\u0000byte"}, "#/title"),
        ({**VALID, "description": "x" * 10_001}, "#/description"),
        ({**VALID, "description": "a\u0000b"}, "#/description"),
        ({**VALID, "status": "blocked"}, "#/status"),
        ({**VALID, "status": None}, "#/status"),
        ({**VALID, "priority": "critical"}, "#/priority"),
        ({**VALID, "priority": 3}, "#/priority"),  # ranks are internal
        ({**VALID, "due_at": "2030-01-01T00:00:00"}, "#/due_at"),  # naive
        ({**VALID, "due_at": "2030-01-01"}, "#/due_at"),  # a date, not a date-time
        ({**VALID, "due_at": 1_900_000_000}, "#/due_at"),  # Unix time
        ({**VALID, "due_at": "1900000000"}, "#/due_at"),
        ({**VALID, "due_at": "tomorrow"}, "#/due_at"),
        ({**VALID, "due_at": "0001-01-01T00:00:00+05:00"}, "#/due_at"),  # before year 1 in UTC
        ({**VALID, "tags": "a,b"}, "#/tags"),
        ({**VALID, "tags": [f"t{n}" for n in range(21)]}, "#/tags"),
        ({**VALID, "tags": ["dup", "dup"]}, "#/tags"),
        ({**VALID, "tags": ["ok", " padded"]}, "#/tags/1"),  # tags are not trimmed: refused
        ({**VALID, "tags": ["ok", "padded\u3000"]}, "#/tags/1"),
        ({**VALID, "tags": [""]}, "#/tags/0"),
        ({**VALID, "tags": ["ok", "  "]}, "#/tags/1"),
        ({**VALID, "tags": ["x" * 33]}, "#/tags/0"),
        ({**VALID, "tags": [7]}, "#/tags/0"),
        ({**VALID, "tags": None}, "#/tags"),
        ({**VALID, "owner": "me"}, "#/owner"),  # unknown field
        ({**VALID, "id": "00000000-0000-4000-8000-000000000000"}, "#/id"),  # read-only
        ({**VALID, "version": 7}, "#/version"),
        ({**VALID, "created_at": "2030-01-01T00:00:00Z"}, "#/created_at"),
        ({**VALID, "updated_at": "2030-01-01T00:00:00Z"}, "#/updated_at"),
    ],
)
async def test_create_rejects(
    client: httpx.AsyncClient, credential, database: Database, body: dict, pointer: str
) -> None:
    response = await client.post("/v1/tasks", json=body, headers=credential.headers)
    body_problem = assert_problem(response, 422, "validation-error")
    assert pointer in pointers(response), body_problem
    assert await count_tasks(database, credential.owner_id) == 0


async def test_create_accepts_the_limits(client: httpx.AsyncClient, credential) -> None:
    body = {
        "title": "x" * 200,
        "description": "d" * 10_000,
        "tags": [f"{n:02d}" + "t" * 30 for n in range(20)],
        "due_at": "9998-12-31T23:59:59.999999-23:59",  # the latest year, any offset
    }
    response = await client.post("/v1/tasks", json=body, headers=credential.headers)
    assert response.status_code == 201, response.text
    assert response.json()["tags"] == body["tags"]


async def test_create_reports_every_invalid_field(client: httpx.AsyncClient, credential) -> None:
    response = await client.post(
        "/v1/tasks",
        json={"title": "", "status": "nope", "tags": ["a", "a"], "extra": 1},
        headers=credential.headers,
    )
    assert pointers(response) == {"#/title", "#/status", "#/tags", "#/extra"}


@pytest.mark.parametrize("field", ["title", "status", "priority", "tags"])
async def test_patch_null_for_a_required_field_is_422(
    client: httpx.AsyncClient, credential, field: str
) -> None:
    location = (await client.post("/v1/tasks", json=VALID, headers=credential.headers)).headers[
        "location"
    ]
    response = await client.patch(location, json={field: None}, headers=credential.headers)
    assert pointers(response) == {f"#/{field}"}
    assert (await client.get(location, headers=credential.headers)).json()["version"] == 1


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({"title": " "}, "#/title"),
        ({"due_at": "2030-01-01T00:00:00"}, "#/due_at"),
        ({"tags": ["a", "a"]}, "#/tags"),
        ({"version": 5}, "#/version"),
        ({"id": "00000000-0000-4000-8000-000000000000"}, "#/id"),
        ({"bogus": True}, "#/bogus"),
    ],
)
async def test_patch_rejects(
    client: httpx.AsyncClient, credential, body: dict, pointer: str
) -> None:
    location = (await client.post("/v1/tasks", json=VALID, headers=credential.headers)).headers[
        "location"
    ]
    response = await client.patch(location, json=body, headers=credential.headers)
    assert pointer in pointers(response)


@pytest.mark.parametrize("content", [b"[]", b'"title"', b"null", b"42"])
async def test_a_body_that_is_not_an_object_is_422(
    client: httpx.AsyncClient, credential, content: bytes
) -> None:
    response = await client.post(
        "/v1/tasks",
        content=content,
        headers={**credential.headers, "Content-Type": "application/json"},
    )
    assert_problem(response, 422)


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/tasks"), ("PATCH", "/v1/tasks/{id}")])
async def test_malformed_json_is_400(
    client: httpx.AsyncClient, credential, method: str, path: str
) -> None:
    location = (await client.post("/v1/tasks", json=VALID, headers=credential.headers)).headers[
        "location"
    ]
    url = path.replace("/v1/tasks/{id}", location)
    for content in (b'{"title": "x"', b"{'title': 'x'}", b"\xff\xfe"):
        response = await client.request(
            method,
            url,
            content=content,
            headers={**credential.headers, "Content-Type": "application/json"},
        )
        assert_problem(response, 400, "malformed-json")


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/xml",
        "application/json; charset=latin-1",
        "application/merge-patch+json",  # a merge patch is not a create body
    ],
)
async def test_post_with_another_media_type_is_415(
    client: httpx.AsyncClient, credential, database: Database, content_type: str | None
) -> None:
    headers = dict(credential.headers)
    if content_type:
        headers["Content-Type"] = content_type
    response = await client.post("/v1/tasks", content=b'{"title": "x"}', headers=headers)
    assert_problem(response, 415, "unsupported-media-type")
    assert response.headers["accept-post"] == "application/json"
    assert await count_tasks(database, credential.owner_id) == 0


async def test_post_accepts_json_with_utf8_charset(client: httpx.AsyncClient, credential) -> None:
    response = await client.post(
        "/v1/tasks",
        content='{"title": "caf\u00e9"}'.encode(),
        headers={**credential.headers, "Content-Type": "Application/JSON; charset=UTF-8"},
    )
    assert response.status_code == 201
    assert response.json()["title"] == "caf\u00e9"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/json-patch+json"])
async def test_patch_with_another_media_type_is_415(
    client: httpx.AsyncClient, credential, content_type: str | None
) -> None:
    location = (await client.post("/v1/tasks", json=VALID, headers=credential.headers)).headers[
        "location"
    ]
    headers = dict(credential.headers)
    if content_type:
        headers["Content-Type"] = content_type
    response = await client.patch(location, content=b'{"title": "x"}', headers=headers)
    assert_problem(response, 415)
    assert response.headers["accept-patch"] == "application/merge-patch+json, application/json"


@pytest.mark.parametrize(
    ("params", "pointer"),
    [
        ({"limit": 0}, "#/query/limit"),
        ({"limit": 101}, "#/query/limit"),
        ({"limit": "ten"}, "#/query/limit"),
        ({"sort": "title"}, "#/query/sort"),
        ({"status": "blocked"}, "#/query/status"),
        ({"priority": "3"}, "#/query/priority"),
        ({"due_before": "2030-01-01T00:00:00"}, "#/query/due_before"),
        ({"due_after": "2030-01-01"}, "#/query/due_after"),
        ({"tag": ""}, "#/query/tag"),
        ({"tag": "x" * 33}, "#/query/tag"),
        ({"tag": " padded"}, "#/query/tag"),
        ({"q": ""}, "#/query/q"),
        ({"q": "a\u0000b"}, "#/query/q"),
        ({"cursor": "c" * 513}, "#/query/cursor"),
    ],
)
async def test_list_rejects_bad_query_parameters(
    client: httpx.AsyncClient, credential, params: dict, pointer: str
) -> None:
    response = await client.get("/v1/tasks", params=params, headers=credential.headers)
    assert pointer in pointers(response)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "k" * 256,
        '""',
        "caf\u00e9",  # not ASCII
        "tab\there",
    ],
)
async def test_invalid_idempotency_key_is_422(
    client: httpx.AsyncClient, credential, database: Database, key: str
) -> None:
    response = await client.post(
        "/v1/tasks",
        json=VALID,
        headers=[*credential.headers.items(), ("Idempotency-Key", key.encode("latin-1"))],
    )
    assert pointers(response) == {"#/header/Idempotency-Key"}
    assert await count_tasks(database, credential.owner_id) == 0


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        ("/v1/tasks", "GET, POST"),
        ("/v1/tasks/00000000-0000-4000-8000-000000000000", "GET, PATCH, DELETE"),
    ],
)
@pytest.mark.parametrize("method", ["PUT", "OPTIONS", "HEAD", "TRACE"])
async def test_other_methods_are_405_with_a_complete_allow_header(
    client: httpx.AsyncClient, credential, path: str, allow: str, method: str
) -> None:
    response = await client.request(method, path, headers=credential.headers)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    if method != "HEAD":
        assert response.headers["content-type"].startswith("application/problem+json")
