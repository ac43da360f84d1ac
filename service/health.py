"""Probes. None needs credentials; none touches more than one cheap query.

- ``/health/live``: the process serves requests. No I/O, so a slow database never gets a
  healthy pod killed (that would turn a database incident into a restart storm).
- ``/health/ready``: this instance should receive traffic: the database answers within a short
  timeout, the schema is at the revision this code expects, and the process is not draining.
- ``/health/startup``: for platforms with one health check that both gates deploys and restarts
  instances (Render). 503 until this process has once seen the database answer at the expected
  schema revision, then 200 with no I/O for the rest of its life: a deploy whose instances
  cannot reach their database is never promoted, and a database outage later on does not get
  running instances restarted (which would not help, and would drop their in-flight requests).
- ``/health``: a summary for humans and uptime checks, in the shape of the Render guide:
  ``status``, ``database``, ``version``, ``timestamp``.

With a read replica both ``/health/ready`` and ``/health`` also report its state and lag, from
the background poll (no query of their own), and never fail for it: reads go to the primary
while the replica is away, so the instance still serves every request correctly.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from starlette.responses import JSONResponse, Response

from service.db import Database
from service.dbtls import tls_failure
from service.http.problems import problem_response, problem_responses
from service.http.state import app_state

READINESS_TIMEOUT_SECONDS = 1.0
UNDEFINED_TABLE = "42P01"  # SQLSTATE undefined_table

UNHEALTHY_DETAIL = {
    "unavailable": "The database does not answer",
    "outdated-schema": "The database schema is not at the expected revision",
}

router = APIRouter(prefix="/health", tags=["health"])


class LiveStatus(BaseModel):
    status: Literal["ok"]


class ReplicaHealth(BaseModel):
    state: Literal["starting", "streaming", "lagging", "unavailable"] = Field(
        description="`streaming`: reads may go to the replica; `lagging` (lag above "
        "DATABASE_READ_MAX_LAG_SECONDS), `unavailable` (it does not answer) and `starting` (not "
        "measured yet): reads go to the primary."
    )
    lag_seconds: float | None = Field(description="Replay lag at the last poll, if known")


class ReadyStatus(BaseModel):
    status: Literal["ready"]
    schema_revision: str
    replica: ReplicaHealth | None = Field(
        None, description="Present when a read replica is configured; never fails readiness"
    )


class HealthSummary(BaseModel):
    status: Literal["healthy", "unhealthy"]
    database: Literal["connected", "unavailable", "outdated-schema"]
    version: str
    timestamp: datetime
    replica: ReplicaHealth | None = Field(
        None, description="Present when a read replica is configured; never makes this unhealthy"
    )


def replica_health(database: Database) -> ReplicaHealth | None:
    monitor = database.replica
    if monitor is None:
        return None
    lag = monitor.lag_seconds
    return ReplicaHealth(
        state=monitor.state.value,
        lag_seconds=round(lag, 3) if lag is not None else None,
    )


@dataclass(frozen=True)
class DatabaseCheck:
    state: Literal["connected", "unavailable", "outdated-schema"]
    revision: str = ""


async def check_database(request: Request) -> DatabaseCheck:
    state = app_state(request)
    database = state.database
    expected = state.schema_heads
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_SECONDS), database.engine.connect() as conn:
            rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    except ProgrammingError as exc:
        # The database answers but was never migrated (the app deployed before its migration
        # ran): an outdated schema, not an outage, so db_up and the DatabaseUnavailable alert
        # stay quiet for a deploy-order mistake.
        if getattr(exc.orig, "sqlstate", None) == UNDEFINED_TABLE:
            return DatabaseCheck("outdated-schema")
        return DatabaseCheck("unavailable")
    except Exception as exc:
        # Refused, timed out, failed: "not ready"; the reason is not the probe's business and
        # must not leak driver messages. A TLS failure is the exception worth a log line: it
        # is permanent until a certificate or setting is fixed, and says exactly which.
        reason = tls_failure(exc)
        if reason is not None:
            database.report_tls_failure(reason)
        return DatabaseCheck("unavailable")
    current = {row[0] for row in rows}
    if current != expected:
        return DatabaseCheck("outdated-schema", ",".join(sorted(current)))
    return DatabaseCheck("connected", ",".join(sorted(current)))


@router.get(
    "/live",
    response_model=LiveStatus,
    summary="Liveness probe",
    description="200 while the process serves requests; does no I/O, so a slow or absent "
    "database never fails it (restarting the pod would not help then).",
)
async def live() -> dict[str, Any]:
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=ReadyStatus,
    summary="Readiness probe",
    description="200 when the database answers within 1 s and its schema is at the revision "
    "this code expects; 503 problem+json while draining, when the database does not answer, or "
    "when the schema is behind (the migration has not run).",
    responses=problem_responses(503),
)
async def ready(request: Request) -> Response:
    state = app_state(request)
    if state.lifecycle.draining:
        return problem_response(request, 503, slug="draining", detail="Shutting down")
    check = await check_database(request)
    state.metrics.set_db_up(check.state != "unavailable")
    if check.state != "connected":
        detail = UNHEALTHY_DETAIL[check.state]
        return problem_response(
            request, 503, slug=check.state, detail=detail, headers={"Retry-After": "5"}
        )
    body: dict[str, Any] = {"status": "ready", "schema_revision": check.revision}
    replica = replica_health(state.database)
    if replica is not None:
        body["replica"] = replica.model_dump()
    return JSONResponse(body)


class StartedStatus(BaseModel):
    status: Literal["started"]


@router.get(
    "/startup",
    response_model=StartedStatus,
    summary="Startup probe",
    description="503 problem+json until this process has once reached the database at the "
    "expected schema revision; from then on 200 without I/O, like /health/live. For a platform "
    "whose single health check both gates deploys and restarts instances (Render).",
    responses=problem_responses(503),
)
async def startup(request: Request) -> Response:
    lifecycle = app_state(request).lifecycle
    if not lifecycle.started:
        check = await check_database(request)
        if check.state != "connected":
            detail = UNHEALTHY_DETAIL[check.state]
            return problem_response(
                request, 503, slug=check.state, detail=detail, headers={"Retry-After": "5"}
            )
        lifecycle.started = True
    return JSONResponse({"status": "started"})


@router.get(
    "",
    response_model=HealthSummary,
    summary="Health summary",
    description=(
        "For humans and uptime checks: status, database state and version, as plain JSON. "
        "503 (same body) unless the database answers at the expected schema revision and "
        "the process is not draining. Orchestrators should use /health/live and /health/ready."
    ),
    responses={503: {"model": HealthSummary, "description": "Unhealthy (same body)"}},
)
async def summary(request: Request) -> Response:
    state = app_state(request)
    check = await check_database(request)
    healthy = check.state == "connected" and not state.lifecycle.draining
    body = HealthSummary(
        status="healthy" if healthy else "unhealthy",
        database=check.state,
        version=state.settings.version,
        timestamp=datetime.now(UTC),
        replica=replica_health(state.database),
    )
    return JSONResponse(
        body.model_dump(mode="json", exclude_none=True), status_code=200 if healthy else 503
    )
