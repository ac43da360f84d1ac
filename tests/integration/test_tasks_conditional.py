"""ETag, If-None-Match (304) and If-Match (412) on the task routes."""

from __future__ import annotations

import httpx
import pytest
from taskskit import assert_problem


@pytest.fixture
async def task(client: httpx.AsyncClient, credential) -> httpx.Response:
    response = await client.post("/v1/tasks", json={"title": "tagged"}, headers=credential.headers)
    assert response.status_code == 201
    return response


@pytest.mark.parametrize("if_none_match", ['"1"', 'W/"1"', "*", '"7", "1"', '"9",W/"1"'])
async def test_if_none_match_hit_is_304_without_body(
    client: httpx.AsyncClient, credential, task: httpx.Response, if_none_match: str
) -> None:
    response = await client.get(
        task.headers["location"], headers={**credential.headers, "If-None-Match": if_none_match}
    )
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == '"1"'


@pytest.mark.parametrize("if_none_match", ['"2"', "1", '"01"', "garbage", '""', 'W/"x"'])
async def test_if_none_match_miss_is_200(
    client: httpx.AsyncClient, credential, task: httpx.Response, if_none_match: str
) -> None:
    response = await client.get(
        task.headers["location"], headers={**credential.headers, "If-None-Match": if_none_match}
    )
    assert response.status_code == 200
    assert response.json()["id"] == task.json()["id"]


async def test_etag_changes_with_every_write_and_old_etag_no_longer_matches(
    client: httpx.AsyncClient, credential, task: httpx.Response
) -> None:
    location = task.headers["location"]
    patched = await client.patch(
        location, json={"status": "done"}, headers={**credential.headers, "If-Match": '"1"'}
    )
    assert patched.status_code == 200
    assert patched.headers["etag"] == '"2"'
    stale = await client.get(location, headers={**credential.headers, "If-None-Match": '"1"'})
    assert stale.status_code == 200
    assert stale.headers["etag"] == '"2"'
    fresh = await client.get(location, headers={**credential.headers, "If-None-Match": '"2"'})
    assert fresh.status_code == 304

    # A writer still holding version 1 is refused and changes nothing.
    refused = await client.patch(
        location, json={"status": "todo"}, headers={**credential.headers, "If-Match": '"1"'}
    )
    assert_problem(refused, 412, "precondition-failed")
    current = (await client.get(location, headers=credential.headers)).json()
    assert (current["status"], current["version"]) == ("done", 2)


@pytest.mark.parametrize("if_match", ['"1"', "*", 'W/"1"', '"5", "1"'])
async def test_patch_with_matching_if_match(
    client: httpx.AsyncClient, credential, task: httpx.Response, if_match: str
) -> None:
    response = await client.patch(
        task.headers["location"],
        json={"title": "ok"},
        headers={**credential.headers, "If-Match": if_match},
    )
    assert response.status_code == 200
    assert response.json()["version"] == 2


@pytest.mark.parametrize("if_match", ['"2"', '"0"', "1", "garbage", '"99999999999"', ""])
async def test_patch_and_delete_with_mismatched_if_match_are_412(
    client: httpx.AsyncClient, credential, task: httpx.Response, if_match: str
) -> None:
    location = task.headers["location"]
    headers = {**credential.headers, "If-Match": if_match}
    assert_problem(await client.patch(location, json={"title": "no"}, headers=headers), 412)
    assert_problem(await client.patch(location, json={}, headers=headers), 412)
    assert_problem(await client.delete(location, headers=headers), 412)
    # Nothing happened.
    current = await client.get(location, headers=credential.headers)
    assert current.json() == task.json()


async def test_delete_with_matching_if_match(
    client: httpx.AsyncClient, credential, task: httpx.Response
) -> None:
    location = task.headers["location"]
    response = await client.delete(location, headers={**credential.headers, "If-Match": '"1"'})
    assert response.status_code == 204
    assert_problem(await client.get(location, headers=credential.headers), 404)


async def test_if_match_on_a_missing_task_is_404(client: httpx.AsyncClient, credential) -> None:
    # Documented choice: a missing task is a 404 whatever the precondition says, so the answer
    # for "not yours" and "does not exist" stays the same.
    missing = "/v1/tasks/00000000-0000-4000-8000-000000000000"
    for if_match in ("*", '"1"'):
        headers = {**credential.headers, "If-Match": if_match}
        assert_problem(await client.patch(missing, json={"title": "x"}, headers=headers), 404)
        assert_problem(await client.delete(missing, headers=headers), 404)
