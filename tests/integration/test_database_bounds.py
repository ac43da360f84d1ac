"""The bounds on the app's own database connections, checked on real connections.

TCP keepalive (DATABASE_TCP_KEEPALIVE_*) is set on every new connection's socket, with
TCP_USER_TIMEOUT at the same total; in direct mode the idle-in-transaction timeout travels as a
startup parameter, so PostgreSQL applies it to each session (behind PgBouncer it is on the role:
the failure lab's PgBouncer-host-dies scenario measures it).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from sqlalchemy import text

from service.db import Database
from service.dbsocket import driver_socket
from service.settings import Settings


async def _driver(database: Database) -> tuple[Any, Any]:
    connection = await database.engine.connect()
    raw = await connection.get_raw_connection()
    return connection, raw.driver_connection


async def test_each_connection_gets_the_keepalive_settings(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        database_tcp_keepalive_idle_seconds=7,
        database_tcp_keepalive_interval_seconds=3,
        database_tcp_keepalive_count=4,
    )
    database = Database(settings)
    try:
        connection, driver = await _driver(database)
        try:
            sock = driver_socket(driver)
            assert sock is not None, "the test database is reached over TCP"
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
            user_timeout = socket.TCP_USER_TIMEOUT
            assert sock.getsockopt(socket.IPPROTO_TCP, user_timeout) == (7 + 3 * 4) * 1000
        finally:
            await connection.close()
    finally:
        await database.dispose()


async def test_keepalive_zero_leaves_the_socket_to_the_os(
    make_settings: Callable[..., Settings],
) -> None:
    database = Database(make_settings(database_tcp_keepalive_idle_seconds=0))
    try:
        connection, driver = await _driver(database)
        try:
            sock = driver_socket(driver)
            assert sock is not None
            user_timeout = socket.TCP_USER_TIMEOUT
            assert sock.getsockopt(socket.IPPROTO_TCP, user_timeout) == 0
        finally:
            await connection.close()
    finally:
        await database.dispose()


async def test_direct_mode_sends_the_idle_in_transaction_timeout(
    make_settings: Callable[..., Settings],
) -> None:
    database = Database(make_settings(database_idle_in_transaction_timeout_ms=4321))
    try:
        async with database.engine.connect() as connection:
            shown = await connection.scalar(text("SHOW idle_in_transaction_session_timeout"))
        assert shown == "4321ms"
    finally:
        await database.dispose()
