"""schemathesis against the running stack, through Nginx and PgBouncer, as one tenant.

Generated requests for every operation in ``/openapi.json`` go through Nginx -> gunicorn ->
PgBouncer -> PostgreSQL with a valid API key. Every response must be in the schema (status,
content type, body, headers) and no 5xx. Path ids are drawn from generated UUIDs, from the
tenant's own tasks (so updates and deletes really happen), and from another tenant's tasks: for
those the answer must never be a success, and no response may carry the other tenant's data.
Afterwards the other tenant's tasks are exactly as they were.

The budget is ``FUZZ_MAX_EXAMPLES`` examples per operation (8 in ``make test``; ``make fuzz``
runs 500).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance
from traffic import Tenant

from testkit import fuzz_settings
from tools.stack import Stack

pytestmark = pytest.mark.stack

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "8"))
OTHERS_TASKS = 3


def make_tasks(stack: Stack, tenant: Tenant, count: int, prefix: str) -> dict[str, str]:
    """``count`` tasks for ``tenant``: id -> ETag."""
    tasks: dict[str, str] = {}
    with httpx.Client(base_url=stack.url, headers=tenant.headers, timeout=10) as client:
        for n in range(count):
            response = client.post("/v1/tasks", json={"title": f"{prefix}-{n}", "tags": [prefix]})
            assert response.status_code == 201, response.text
            tasks[response.json()["id"]] = response.headers["etag"]
    return tasks


def current_etags(stack: Stack, tenant: Tenant, ids: list[str]) -> dict[str, str | None]:
    with httpx.Client(base_url=stack.url, headers=tenant.headers, timeout=10) as client:
        return {
            task_id: (response.headers["etag"] if response.status_code == 200 else None)
            for task_id in ids
            for response in [client.get(f"/v1/tasks/{task_id}")]
        }


def test_fuzzing_through_the_stack_finds_no_5xx_no_schema_violation_no_leak(
    stack: Stack, tenant: Tenant
) -> None:
    other_name = f"other-{uuid.uuid4().hex[:12]}"
    other = Tenant(other_name, stack.create_api_key(other_name))
    # A marker only the other tenant's data contains: its tasks' titles and tag.
    marker = f"secret{uuid.uuid4().hex[:16]}"
    others = make_tasks(stack, other, OTHERS_TASKS, marker)
    own = list(make_tasks(stack, tenant, 5, "mine"))
    other_ids = sorted(others)

    schema = schemathesis.openapi.from_url(stack.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 8
    failures: list[str] = []
    exercised = {"own": 0, "other": 0, "answers": 0}

    def fuzz(operation: Any, excluded: list[Any]) -> None:
        has_id = any(p.name == "task_id" for p in operation.path_parameters)
        ids = st.sampled_from([None, *own, *other_ids]) if has_id else st.just(None)

        @given(case=operation.as_strategy(), task_id=ids)
        @fuzz_settings(MAX_EXAMPLES)
        def check(case: Any, task_id: str | None) -> None:
            if task_id is not None:
                case.path_parameters["task_id"] = task_id
            if case.headers and "Idempotency-Key" in case.headers:
                # A new key per new request, as a client makes one (a reused key with another
                # body is, rightly, a 422).
                case.headers["Idempotency-Key"] = f"fuzz-{uuid.uuid4()}"
            # On a real task, a generated If-Match is (rightly) a 412: the answer depends on
            # state no schema describes, so "valid data is accepted" is not checked there.
            skip = excluded if task_id is None else [*excluded, positive_data_acceptance]
            response = case.call_and_validate(
                base_url=stack.url, headers=tenant.headers, excluded_checks=skip
            )
            exercised["answers"] += 1
            assert marker not in response.text, "another owner's data in a response"
            if task_id in others:
                exercised["other"] += 1
                # Indistinguishable from a missing task: never a success, never a 412/304
                # that would confirm it exists.
                assert response.status_code not in (200, 204, 304, 412), (
                    f"{case.method} {task_id} of another owner -> {response.status_code}"
                )
            elif task_id is not None:
                exercised["own"] += 1

        check()

    for operation in operations:
        # `cursor` is an opaque token the API issued; any other string is a documented 400
        # invalid-cursor, which no schema can express.
        excluded = [positive_data_acceptance] if operation.label == "GET /v1/tasks" else []
        try:
            fuzz(operation, excluded)
        except Exception as failure:  # collect every operation's findings, then report
            failures.append(f"{operation.label}: {failure}")
    assert not failures, "\n\n".join(failures)

    assert exercised["answers"] >= 8 * MAX_EXAMPLES // 2
    assert exercised["other"] > 0, "no request aimed at the other owner's tasks"
    assert exercised["own"] > 0, "no request aimed at the tenant's own tasks"
    # The other tenant's tasks are untouched: same ETags (same versions), none deleted.
    assert current_etags(stack, other, other_ids) == others
    print(
        f"\nfuzz through nginx: {len(operations)} operations, {exercised['answers']} requests "
        f"({exercised['own']} at own tasks, {exercised['other']} at another owner's), no failure"
    )
