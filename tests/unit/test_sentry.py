"""The Sentry scrubber, and that Sentry starts only with a DSN."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import sentry_sdk
from secretskit import API_KEY, DB_PASSWORD, GATEWAY, JWT_SECRET
from secretskit import settings_with_secrets as settings

from service.sentry import capture_exception, init_sentry, make_scrubber


def event() -> dict[str, Any]:
    return {
        "level": "error",
        "exception": {
            "values": [
                {
                    "type": "DBAPIError",
                    "value": f"could not connect: password {DB_PASSWORD} rejected",
                    "stacktrace": {"frames": [{"vars": {"token": JWT_SECRET}}]},
                }
            ]
        },
        "request": {
            "url": "http://api/v1/tasks",
            "method": "POST",
            "query_string": f"api_key={API_KEY}",
            "data": {"title": "private body"},
            "cookies": {"session": "cookie-value"},
            "headers": {
                "Authorization": f"Bearer {API_KEY}",
                "X-API-Key": API_KEY,
                "Cookie": "session=cookie-value",
                "X-Gateway-Secret": GATEWAY,
                "User-Agent": "curl/8",
            },
        },
        "breadcrumbs": {"values": [{"message": f"gateway secret was {GATEWAY}"}]},
        "extra": {"note": f"jwt {JWT_SECRET}"},
    }


def test_scrubber_drops_bodies_cookies_credentials_and_secret_values() -> None:
    scrubbed = make_scrubber(settings())(event(), {})
    text = json.dumps(scrubbed)
    for leak in (DB_PASSWORD, JWT_SECRET, GATEWAY, "S3cr3tPart", "private body", "cookie-value"):
        assert leak not in text, leak
    request = scrubbed["request"]
    assert "data" not in request
    assert "cookies" not in request
    assert set(request["headers"]) == {"User-Agent"}
    # What makes the event useful stays.
    assert scrubbed["exception"]["values"][0]["type"] == "DBAPIError"
    assert "could not connect" in scrubbed["exception"]["values"][0]["value"]
    assert request["url"] == "http://api/v1/tasks"


def test_sentry_starts_only_with_a_dsn() -> None:
    assert init_sentry(settings()) is False
    assert not sentry_sdk.get_client().is_active()


def test_with_a_dsn_sentry_is_configured_to_send_no_pii() -> None:
    configured = settings(
        sentry_dsn="http://publickey@127.0.0.1:9/1",
        sentry_traces_sample_rate=0.25,
        environment="staging",
    )
    try:
        assert init_sentry(configured) is True
        client = sentry_sdk.get_client()
        assert client.is_active()
        options = client.options
        assert options["environment"] == "staging"
        assert options["release"] == configured.version
        assert options["traces_sample_rate"] == 0.25
        assert not options["send_default_pii"]
        assert options["data_collection"]["user_info"] is False
        assert options["event_scrubber"] is not None
        assert options["max_request_body_size"] == "never"
        assert options["include_local_variables"] is False
        assert options["before_send"] is not None
        scrubbed = options["before_send"](event(), {})
        assert GATEWAY not in json.dumps(scrubbed)
    finally:
        sentry_sdk.get_client().close(timeout=0)
        sentry_sdk.get_global_scope().set_client(None)
    assert not sentry_sdk.get_client().is_active()


def test_an_unhandled_error_is_sent_only_once_sentry_started() -> None:
    error = RuntimeError(f"boom with {JWT_SECRET}")
    capture_exception(error)  # no client: nothing to send to, and nothing raised
    sent: list[dict[str, Any]] = []
    try:
        assert init_sentry(settings(sentry_dsn="http://publickey@127.0.0.1:9/1")) is True
        options = sentry_sdk.get_client().options
        scrub = options["before_send"]

        def keep(event: Any, hint: Any) -> None:
            sent.append(scrub(event, hint))  # what would leave the process; nothing does

        options["before_send"] = keep
        capture_exception(error)
    finally:
        sentry_sdk.get_client().close(timeout=0)
        sentry_sdk.get_global_scope().set_client(None)
    assert len(sent) == 1
    assert sent[0]["exception"]["values"][0]["type"] == "RuntimeError"
    assert JWT_SECRET not in json.dumps(sent[0])


def test_without_a_dsn_the_app_never_imports_the_sdk() -> None:
    """The SDK (and httpx, without a JWKS URL) costs ~0.5 s of every start: the app built
    without them configured must not import them."""
    probe = (
        "import sys\n"
        "from service.app import create_app\n"
        "from service.settings import load_settings\n"
        "create_app(load_settings())\n"
        "print(sorted(m for m in ('sentry_sdk', 'httpx') if m in sys.modules))\n"
    )
    env = {**os.environ, "DATABASE_URL": "postgresql+asyncpg://app:pw@127.0.0.1:9/app"}
    for name in ("SENTRY_DSN", "JWT_JWKS_URL"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
