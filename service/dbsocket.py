"""TCP keepalive and TCP_USER_TIMEOUT on the app's database sockets.

A database host that vanishes without a FIN or a reset (a blackholed network, a host that lost
power) leaves the app's sockets open and silent. A statement sent on one is bounded by the
statement timeout; an idle pooled connection is not bounded by anything but TCP, and the OS
default keepalive starts probing after two hours. asyncpg takes no keepalive options (libpq's
``keepalives_*`` parameters have no counterpart there), so each new connection's socket gets
them here, straight after it connects: first probe after DATABASE_TCP_KEEPALIVE_IDLE_SECONDS,
then every ..._INTERVAL_SECONDS, dropped after ..._COUNT unanswered probes; TCP_USER_TIMEOUT
bounds unacknowledged data by the same total. asyncpg then sees the connection lost, and the
pool's check-out test (service/db.py) discards it without a round trip.
"""

from __future__ import annotations

import socket
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from service.settings import Settings


def keepalive_options(settings: Settings) -> list[tuple[int, int, int]]:
    """``setsockopt`` triples for the settings (Linux names; others where the OS lacks them)."""
    if not settings.database_tcp_keepalive_idle_seconds:
        return []
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    wanted = [
        ("TCP_KEEPIDLE", settings.database_tcp_keepalive_idle_seconds),
        ("TCP_KEEPINTVL", settings.database_tcp_keepalive_interval_seconds),
        ("TCP_KEEPCNT", settings.database_tcp_keepalive_count),
        ("TCP_USER_TIMEOUT", settings.database_dead_peer_seconds() * 1000),
    ]
    for name, value in wanted:
        option = getattr(socket, name, None)
        if option is not None:
            options.append((socket.IPPROTO_TCP, option, value))
    return options


def driver_socket(driver_connection: Any) -> socket.socket | None:
    """The TCP socket under an asyncpg connection (None for a Unix socket or no transport)."""
    transport = getattr(driver_connection, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return sock  # type: ignore[no-any-return]


def apply_keepalive(engine: AsyncEngine, settings: Settings) -> None:
    options = keepalive_options(settings)
    if not options:
        return

    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, record: Any) -> None:
        sock = driver_socket(getattr(dbapi_connection, "driver_connection", None))
        if sock is not None:
            for level, option, value in options:
                sock.setsockopt(level, option, value)
