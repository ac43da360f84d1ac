"""Every bound is one setting, carried the same everywhere it is configured.

The request deadline must sit below every proxy's read timeout with margin (the app answers,
not the proxy), and above the longest single database failure (which then keeps its precise
answer). PgBouncer's keepalive matches the app's. docs/reliability.md, section 4.
"""

from __future__ import annotations

import configparser
from pathlib import Path
from typing import Any

import yaml
from conftest import FULLNAME, ROOT, find, render

from service.settings import Settings, load_settings
from testkit import load_module

DEFAULTS = load_settings(environment="test")
# The clean-up of a cancelled request's connection (SQLAlchemy's close of an invalidated
# asyncpg connection, 2 s) plus scheduling slack.
DEADLINE_MARGIN_S = 5


def _seconds(value: str) -> float:
    return float(value.rstrip("s"))


def proxy_read_timeouts() -> dict[str, float]:
    nginx = load_module(ROOT / "nginx" / "render.py", "bounds_nginx_render")
    production = yaml.safe_load(
        (ROOT / "charts" / "fastapi-app" / "ci" / "production-values.yaml").read_text()
    )
    base_ingress = yaml.safe_load((ROOT / "k8s" / "base" / "ingress.yaml").read_text())
    annotation = "nginx.ingress.kubernetes.io/proxy-read-timeout"
    return {
        "nginx/ PROXY_READ_TIMEOUT": _seconds(nginx.DEFAULTS["PROXY_READ_TIMEOUT"]),
        "chart production ingress": _seconds(production["ingress"]["annotations"][annotation]),
        "k8s base ingress": _seconds(base_ingress["metadata"]["annotations"][annotation]),
    }


def test_the_request_deadline_sits_below_every_proxy_read_timeout() -> None:
    deadline = DEFAULTS.request_timeout_seconds
    assert deadline > 0
    for where, read_timeout in proxy_read_timeouts().items():
        assert deadline + DEADLINE_MARGIN_S <= read_timeout, where


def test_the_request_deadline_exceeds_the_longest_single_database_failure() -> None:
    longest = (
        DEFAULTS.sqlalchemy_pool_timeout
        + DEFAULTS.database_statement_timeout_ms / 1000
        + 1  # the client-side backstop after the server's statement timeout
        + DEFAULTS.database_connect_timeout  # the bounded rollback
    )
    assert longest < DEFAULTS.request_timeout_seconds


def test_the_chart_and_the_plain_manifests_carry_the_defaults() -> None:
    values = yaml.safe_load((ROOT / "charts" / "fastapi-app" / "values.yaml").read_text())
    env = dict(
        line.split("=", 1)
        for line in (ROOT / "k8s" / "base" / "app.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name in (
        "request_timeout_seconds",
        "database_idle_in_transaction_timeout_ms",
        "database_tcp_keepalive_idle_seconds",
        "database_tcp_keepalive_interval_seconds",
        "database_tcp_keepalive_count",
    ):
        default = Settings.model_fields[name].default
        assert float(values["config"][name.upper()]) == default, name
        assert float(env[name.upper()]) == default, name


def _keepalive(ini: str) -> dict[str, int]:
    parser = configparser.ConfigParser(inline_comment_prefixes=(";",), strict=False)
    parser.read_string(ini.replace("%include", ";%include"))
    section: Any = parser["pgbouncer"]
    keys = ("tcp_keepalive", "tcp_keepidle", "tcp_keepintvl", "tcp_keepcnt", "tcp_user_timeout")
    return {key: int(section[key]) for key in keys}


def test_pgbouncer_keepalive_matches_the_apps_everywhere() -> None:
    expected = {
        "tcp_keepalive": 1,
        "tcp_keepidle": DEFAULTS.database_tcp_keepalive_idle_seconds,
        "tcp_keepintvl": DEFAULTS.database_tcp_keepalive_interval_seconds,
        "tcp_keepcnt": DEFAULTS.database_tcp_keepalive_count,
        "tcp_user_timeout": DEFAULTS.database_dead_peer_seconds() * 1000,
    }
    objects = render(
        {"pgbouncer": {"enabled": True, "postgres": {"host": "db"}, "auth": {"userlist": "x"}}}
    )
    chart_ini = find(objects, "ConfigMap", f"{FULLNAME}-pgbouncer").obj["data"]["pgbouncer.ini"]
    inis = {
        "pgbouncer/pgbouncer.ini": (ROOT / "pgbouncer" / "pgbouncer.ini").read_text(),
        "k8s/base/pgbouncer/pgbouncer.ini": Path(
            ROOT / "k8s" / "base" / "pgbouncer" / "pgbouncer.ini"
        ).read_text(),
        "chart": chart_ini,
    }
    for where, ini in inis.items():
        assert _keepalive(ini) == expected, where
    assert "idle_transaction_timeout = 30" in chart_ini
    assert "query_wait_timeout = 10" in chart_ini


def _upstream_keepalive_timeout() -> float:
    template = (ROOT / "nginx" / "templates" / "10-fastapi-app.conf.template").read_text()
    upstream = template[template.index("upstream fastapi_app {") :]
    upstream = upstream[: upstream.index("\n}")]
    lines = [line.split("#")[0].strip() for line in upstream.splitlines()]
    (value,) = [
        line.split()[1].rstrip(";") for line in lines if line.startswith("keepalive_timeout")
    ]
    return _seconds(value)


def test_nginx_closes_idle_upstream_connections_before_the_app_does() -> None:
    """A server closing a kept-alive connection races the proxy writing its next request on
    it (a POST caught that way is nginx's 502): nginx's idle timeout must come first, both in
    steady state (gunicorn's keepalive) and while a worker drains, with a second of margin."""
    from service.entrypoints import worker

    nginx_idle = _upstream_keepalive_timeout()
    assert nginx_idle + 1 <= worker.IDLE_CLOSE_AFTER_SECONDS
    # The drain outlasts the idle threshold, so idle connections are closed during it (by
    # nginx) rather than by uvicorn's shutdown at its end, which closes them at once.
    assert worker.IDLE_CLOSE_AFTER_SECONDS < worker.KEEPALIVE_DRAIN_SECONDS
    assert nginx_idle < DEFAULTS.gunicorn_keepalive
