"""Typed access to the application state and to the per-request values in an ASGI scope.

The application state (``service.state.AppState``) is the lifespan state's one entry; the
per-request values are written into the request's own copy of ``scope["state"]`` by the
middleware and dependencies that learn them, and read back only through these functions.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from starlette.types import Scope

from service.security.principal import Principal
from service.state import APP_STATE_KEY, AppRuntime, AppState, runtime_of

REQUEST_ID = "request_id"
CORRELATION_ID = "correlation_id"
PRINCIPAL = "principal"
GATEWAY_PRINCIPAL = "gateway_principal"


def app_state(connection: HTTPConnection) -> AppState:
    """The application state for a request served inside the lifespan."""
    state: AppState = connection.scope["state"][APP_STATE_KEY]
    return state


def app_state_of(scope: Scope) -> AppState | None:
    """The application state, or None for a scope outside the lifespan (middleware use)."""
    state: AppState | None = scope.get("state", {}).get(APP_STATE_KEY)
    return state


def app_runtime(app: Starlette) -> AppRuntime:
    runtime = runtime_of(app)
    if runtime is None:
        raise LookupError("this app was not built by service.app.create_app")
    return runtime


def _request_values(scope: Scope) -> dict[str, Any]:
    values: dict[str, Any] = scope.setdefault("state", {})
    return values


def set_request_ids(scope: Scope, request_id: str, correlation_id: str) -> None:
    values = _request_values(scope)
    values[REQUEST_ID] = request_id
    values[CORRELATION_ID] = correlation_id


def request_id(scope: Scope) -> str | None:
    value: str | None = scope.get("state", {}).get(REQUEST_ID)
    return value


def set_principal(scope: Scope, principal: Principal) -> None:
    _request_values(scope)[PRINCIPAL] = principal


def principal(scope: Scope) -> Principal | None:
    value: Principal | None = scope.get("state", {}).get(PRINCIPAL)
    return value


def set_gateway_principal(scope: Scope, principal: Principal) -> None:
    """The consumer the gateway vouched for (only behind a valid gateway secret)."""
    _request_values(scope)[GATEWAY_PRINCIPAL] = principal


def gateway_principal(scope: Scope) -> Principal | None:
    value: Principal | None = scope.get("state", {}).get(GATEWAY_PRINCIPAL)
    return value
