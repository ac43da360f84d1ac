"""``/v1/tasks``: parse, authorise, call the use case (``service``), map the result to HTTP.

Responses are serialised with orjson straight from the repository's records; the pydantic
models in ``schemas`` describe them in OpenAPI (``response_model``) without FastAPI
re-validating every response on the hot path.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.db import Transaction
from service.http.dependencies import CONSISTENCY_TOKEN_HEADER, ReadAccessDep, TransactionDep
from service.http.problems import problem_responses
from service.http.state import app_state
from service.idempotency.store import StoredResponse
from service.security.dependencies import WritePrincipal
from service.tasks.etag import etag_for, parse_etag_condition
from service.tasks.http import (
    JSON,
    MERGE_PATCH_JSON,
    IdempotencyKeyHeader,
    IfMatchHeader,
    IfNoneMatchHeader,
    idempotency_key,
    require_media_type,
    task_uuid,
)
from service.tasks.parameters import TaskListParams
from service.tasks.repository import TaskReader, TaskRecord
from service.tasks.schemas import (
    TASK_FIELDS,
    TaskCreate,
    TaskOut,
    TaskPage,
    TaskPatch,
)
from service.tasks.service import IdempotentRequest, Replayed, TaskService

PREFIX = "/v1/tasks"
router = APIRouter(prefix=PREFIX, tags=["tasks"])

_ETAG_HEADER = {"description": 'The task\'s entity tag, e.g. `"3"`', "schema": {"type": "string"}}
_LOCATION_HEADER = {"description": "The new task's URL", "schema": {"type": "string"}}
_TOKEN_HEADER = {
    "description": "Present when reads may be served by a read replica: send it back in the "
    "`Consistency-Token` request header of your next reads and they will see this write, "
    "whichever instance serves them. Keep the most recent one you received.",
    "schema": {"type": "string", "examples": ["0/1A2B3C4"]},
}
_REPLAYED_HEADER = {
    "description": "`true` when this is the stored response to an earlier request with the "
    "same Idempotency-Key",
    "schema": {"type": "string", "enum": ["true"]},
}

TaskId = Annotated[
    str,
    Path(
        description="The task's id (a UUID). Anything else is simply a task that does not "
        "exist: 404.",
        json_schema_extra={"format": "uuid"},
    ),
]
# Declared as parameters after the principal, so an anonymous request is a 401 before a 415.
JsonBody = Annotated[None, Depends(require_media_type(JSON, advertise="Accept-Post"))]
MergePatchBody = Annotated[
    None, Depends(require_media_type(MERGE_PATCH_JSON, JSON, advertise="Accept-Patch"))
]


def _document(record: TaskRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "title": record.title,
        "description": record.description,
        "status": record.status,
        "priority": record.priority,
        "due_at": record.due_at,
        "tags": record.tags,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "version": record.version,
    }


def _uuid_subclass(value: Any) -> str:
    # asyncpg returns ids as its own uuid.UUID subclass, which orjson does not serialise.
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(type(value).__name__)


def _json(content: Any) -> bytes:
    # Timestamps come back from PostgreSQL in UTC; "Z" is the RFC 3339 spelling of that.
    return orjson.dumps(content, default=_uuid_subclass, option=orjson.OPT_UTC_Z)


def _task_response(record: TaskRecord, status_code: int = 200) -> Response:
    return Response(
        _json(_document(record)),
        status_code=status_code,
        media_type=JSON,
        headers={"ETag": etag_for(record.version)},
    )


def _service(request: Request, session: Transaction) -> TaskService:
    ttl = timedelta(hours=app_state(request).settings.idempotency_ttl_hours)
    return TaskService(session, idempotency_ttl=ttl)


def _location(record: TaskRecord) -> str:
    return f"{PREFIX}/{record.id}"


async def _committed(request: Request, session: Any, response: Response) -> Response:
    """Commit the request's transaction; with a replica, hand the client its consistency token."""
    token = await app_state(request).database.commit(session)
    if token is not None:
        response.headers[CONSISTENCY_TOKEN_HEADER] = token
    return response


@router.post(
    "",
    status_code=201,
    response_model=TaskOut,
    summary="Create a task",
    description="Creates a task owned by the caller. Send an `Idempotency-Key` to make "
    "retries safe.",
    responses={
        201: {
            "description": "Created (or, with `Idempotent-Replayed: true`, the stored response "
            "to an earlier request with the same Idempotency-Key)",
            "headers": {
                "Location": _LOCATION_HEADER,
                "ETag": _ETAG_HEADER,
                "Idempotent-Replayed": _REPLAYED_HEADER,
                CONSISTENCY_TOKEN_HEADER: _TOKEN_HEADER,
            },
        },
        **problem_responses(400, 401, 403, 409, 413, 415, 422, 429, 503, 504),
    },
)
async def create_task(
    request: Request,
    principal: WritePrincipal,
    _json_body: JsonBody,
    body: TaskCreate,
    session: TransactionDep,
    idempotency_key_header: IdempotencyKeyHeader = None,
) -> Response:
    key = idempotency_key(idempotency_key_header)
    idempotency = (
        IdempotentRequest(key, request.method, request.url.path) if key is not None else None
    )
    created = await _service(request, session).create(
        principal.owner_id, body, idempotency=idempotency, response_for=_stored_created
    )
    if isinstance(created, Replayed):
        response = _replay(created.stored)
    else:
        # The same bytes and headers as the response stored for a retry (``_stored_created``).
        response = _task_response(created.record, 201)
        response.headers["Location"] = _location(created.record)
    return await _committed(request, session, response)


def _stored_created(record: TaskRecord) -> StoredResponse:
    """The 201 a retry with the same Idempotency-Key gets again (JSON values, as stored)."""
    headers = {"Location": _location(record), "ETag": etag_for(record.version)}
    return StoredResponse(201, orjson.loads(_json(_document(record))), headers)


def _replay(stored: StoredResponse) -> Response:
    body = stored.body
    if isinstance(body, dict):
        # JSONB does not keep key order; put the fields back in the order of the original.
        body = {name: body[name] for name in TASK_FIELDS if name in body} | body
    return Response(
        _json(body),
        status_code=stored.status_code,
        media_type=JSON,
        headers={**stored.headers, "Idempotent-Replayed": "true"},
    )


@router.get(
    "",
    response_model=TaskPage,
    summary="List tasks",
    description=(
        "The caller's tasks, one page at a time (keyset pagination: pages stay consistent "
        "while tasks are added). Pass `next_cursor` back as `cursor`, with the same `sort` and "
        "filters, for the next page; it is `null` on the last page.\n\n"
        "Orders: `-created_at` (default, newest first), `created_at`, `due_at` / `-due_at` "
        "(tasks without a due date come last either way), `priority` (urgent first, then "
        "newest first). Ties are broken by creation time and then id, so the order is total."
    ),
    responses=problem_responses(400, 401, 403, 422, 429, 503),
)
async def list_tasks(access: ReadAccessDep, query: TaskListParams) -> Response:
    filters = query.filters()
    owner_id = access.principal.owner_id
    page = await access.reads.run(
        lambda connection: TaskReader(connection).list_page(
            owner_id,
            filters=filters,
            sort=query.sort,
            limit=query.limit,
            cursor=query.cursor,
        )
    )
    content = {"items": [_document(item) for item in page.items], "next_cursor": page.next_cursor}
    return Response(_json(content), media_type=JSON)


@router.get(
    "/{task_id}",
    response_model=TaskOut,
    summary="Get a task",
    description="Returns the task with its `ETag`; with a matching `If-None-Match`, 304.",
    responses={
        200: {"headers": {"ETag": _ETAG_HEADER}},
        304: {"description": "Not Modified", "headers": {"ETag": _ETAG_HEADER}},
        # 422 cannot happen here, but FastAPI would otherwise document its own JSON 422 shape
        # for any route with parameters; every 422 of this API is problem+json.
        **problem_responses(400, 401, 403, 404, 422, 429, 503),
    },
)
async def get_task(
    access: ReadAccessDep,
    task_id: TaskId,
    if_none_match: IfNoneMatchHeader = None,
) -> Response:
    # Parsed first: a malformed or oversized If-None-Match costs no database round trip.
    condition = parse_etag_condition(if_none_match)
    task = task_uuid(task_id)
    owner_id = access.principal.owner_id
    record = await access.reads.run(lambda connection: TaskReader(connection).get(owner_id, task))
    if condition is not None and condition.matches(record.version):
        return Response(status_code=304, headers={"ETag": etag_for(record.version)})
    return _task_response(record)


@router.patch(
    "/{task_id}",
    response_model=TaskOut,
    summary="Update a task",
    description=(
        "JSON merge patch (RFC 7396): send only the fields to change; `null` clears "
        "`description` or `due_at`. Every change increments `version` and so the `ETag`. "
        "Send `If-Match` with the ETag you read to avoid overwriting someone else's change."
    ),
    responses={
        200: {"headers": {"ETag": _ETAG_HEADER, CONSISTENCY_TOKEN_HEADER: _TOKEN_HEADER}},
        **problem_responses(400, 401, 403, 404, 412, 413, 415, 422, 429, 503, 504),
    },
    openapi_extra={
        "requestBody": {
            "content": {MERGE_PATCH_JSON: {"schema": {"$ref": "#/components/schemas/TaskPatch"}}}
        }
    },
)
async def update_task(
    request: Request,
    principal: WritePrincipal,
    _merge_patch_body: MergePatchBody,
    task_id: TaskId,
    patch: TaskPatch,
    session: TransactionDep,
    if_match: IfMatchHeader = None,
) -> Response:
    record = await _service(request, session).update(
        principal.owner_id,
        task_uuid(task_id),
        patch.changes(),
        if_match=parse_etag_condition(if_match),
    )
    return await _committed(request, session, _task_response(record))


@router.delete(
    "/{task_id}",
    status_code=204,
    summary="Delete a task",
    description="Deletes the task; with `If-Match`, only if it has not changed since.",
    responses={
        204: {"description": "Deleted", "headers": {CONSISTENCY_TOKEN_HEADER: _TOKEN_HEADER}},
        **problem_responses(400, 401, 403, 404, 412, 422, 429, 503, 504),
    },
)
async def delete_task(
    request: Request,
    principal: WritePrincipal,
    task_id: TaskId,
    session: TransactionDep,
    if_match: IfMatchHeader = None,
) -> Response:
    await _service(request, session).delete(
        principal.owner_id, task_uuid(task_id), if_match=parse_etag_condition(if_match)
    )
    return await _committed(request, session, Response(status_code=204))


# Starlette answers a method a path does not support with the Allow header of whichever route
# for that path it tried first (GET alone for /v1/tasks/{id}). RFC 9110 wants every method the
# resource supports, so the remaining methods land here instead. Registered last, and not in
# the schema: these are not operations.
_ALL_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"}


def _method_not_allowed(path: str, *allowed: str) -> None:
    allow = ", ".join(allowed)

    async def method_not_allowed() -> Response:
        raise StarletteHTTPException(405, headers={"Allow": allow})

    router.add_api_route(
        path,
        method_not_allowed,
        methods=sorted(_ALL_METHODS - set(allowed)),
        include_in_schema=False,
        name=f"method_not_allowed{path.replace('/', '_').replace('{', '').replace('}', '')}",
    )


_method_not_allowed("", "GET", "POST")
_method_not_allowed("/{task_id}", "GET", "PATCH", "DELETE")
