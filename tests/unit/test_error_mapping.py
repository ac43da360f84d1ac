"""How unexpected exceptions become responses: 503 for database trouble, 500 otherwise."""

from __future__ import annotations

import json

import asyncpg
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.requests import Request

from service.errors import is_connection_error
from service.http.problems import unexpected_error_response


def _request() -> Request:
    return Request(
        {"type": "http", "method": "GET", "path": "/v1/tasks", "headers": [], "state": {}}
    )


def test_statement_timeout_is_503_with_retry_after() -> None:
    exc = DBAPIError("SELECT secret_column FROM t", {}, asyncpg.QueryCanceledError("canceling"))
    response = unexpected_error_response(_request(), exc)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "2"
    body = json.loads(bytes(response.body))
    assert body["type"].endswith("/query-timeout")
    assert "secret_column" not in bytes(response.body).decode()


def test_lost_connection_is_503_database_unavailable() -> None:
    exc = OperationalError("SELECT 1", {}, ConnectionRefusedError("refused"))
    assert is_connection_error(exc)
    response = unexpected_error_response(_request(), exc)
    assert response.status_code == 503
    assert json.loads(bytes(response.body))["type"].endswith("/database-unavailable")


def test_programming_error_is_an_opaque_500() -> None:
    exc = DBAPIError(
        "SELECT * FROM tasks WHERE password = 'hunter2'",
        {},
        asyncpg.UndefinedColumnError("column does not exist"),
    )
    assert not is_connection_error(exc)
    response = unexpected_error_response(_request(), exc)
    assert response.status_code == 500
    text = bytes(response.body).decode()
    assert "hunter2" not in text
    assert "SELECT" not in text
    assert "does not exist" not in text
    assert json.loads(text)["instance"] == "/v1/tasks"


def test_the_adapters_own_exceptions_unwrapped_are_classified_like_the_engines() -> None:
    """A raw pool checkout (the read path) gets the asyncpg adapter's DB-API classes without
    an engine ``DBAPIError`` around them: a database starting up is still an outage (503)."""
    from sqlalchemy.dialects.postgresql.asyncpg import dialect

    dbapi = dialect.import_dbapi()
    try:
        try:
            raise asyncpg.CannotConnectNowError("the database system is starting up")
        except asyncpg.CannotConnectNowError as driver:
            raise dbapi.InterfaceError("connect failed") from driver
    except dbapi.InterfaceError as adapter:
        starting_up = adapter
    assert is_connection_error(starting_up)
    assert is_connection_error(dbapi.OperationalError("connection lost"))
    # Misuse the client caused is not an outage.
    assert not is_connection_error(dbapi.InterfaceError("too many bind parameters"))
