"""The log pipeline without I/O: redaction, exception summaries, formats, request-id picking."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import pytest
import structlog
from secretskit import API_KEY, DB_PASSWORD, GATEWAY, JWT_SECRET, settings_with_secrets

from service.observability.logging import (
    REDACTED,
    Redactor,
    build_handler,
    configure_logging,
    summarise_exception,
)
from service.observability.request_id import pick_ids
from service.settings import Settings


def settings(**overrides: Any) -> Settings:
    return settings_with_secrets(gateway_secret_header="x-zuplo-secret", **overrides)


def redactor() -> Redactor:
    config = settings()
    return Redactor(config.secret_values(), extra_keys=[config.gateway_secret_header])


def test_secret_values_are_masked_inside_any_string() -> None:
    event = redactor()(
        None,
        "info",
        {
            "event": f"connect to postgresql://app:{DB_PASSWORD}@db/app failed",
            "detail": f"token {JWT_SECRET} and {GATEWAY}",
            "nested": {"list": [f"x{GATEWAY}y", 3, None], "ok": "plain"},
        },
    )
    text = json.dumps(event)
    for secret in (DB_PASSWORD, JWT_SECRET, GATEWAY):
        assert secret not in text
    assert event["event"] == f"connect to postgresql://app:{REDACTED}@db/app failed"
    assert event["nested"]["list"] == [f"x{REDACTED}y", 3, None]
    assert event["nested"]["ok"] == "plain"


@pytest.mark.parametrize(
    "key",
    [
        "authorization",
        "Authorization",
        "x-api-key",
        "cookie",
        "set-cookie",
        "x-zuplo-secret",
        "password",
        "db_password",
        "refresh_token",
        "api_key",
        "client_secret",
    ],
)
def test_credential_keys_are_masked_whatever_their_value(key: str) -> None:
    event = redactor()(None, "info", {"event": "x", key: "anything at all", "headers": {key: "v"}})
    assert event[key] == REDACTED
    assert event["headers"][key] == REDACTED


def test_api_keys_keep_their_prefix_and_bearer_tokens_go() -> None:
    text = redactor().text(f"key={API_KEY} auth=Bearer eyJhbGciOi.eyJzdWIi.c2ln and more")
    assert "S3cr3tPart" not in text
    assert "fa_abcdefghijkl_***" in text
    assert "eyJhbGciOi" not in text
    assert "Bearer ***" in text
    assert text.endswith("and more")


def test_a_secret_behind_a_bearer_scheme_is_masked_whole() -> None:
    # The token pattern stops at "!"; the configured secret must still go entirely.
    secret = "tok3n-part!and-the-rest-of-it"
    text = Redactor([secret]).text(f"Authorization: Bearer {secret} BEARER other.token ok")
    assert "and-the-rest" not in text
    assert "tok3n" not in text
    assert "other.token" not in text
    assert text == "Authorization: Bearer *** BEARER *** ok"


def test_without_secrets_the_redactor_still_masks_patterns() -> None:
    plain = Redactor([])
    assert plain.text("nothing secret") == "nothing secret"
    assert "S3cr3tPart" not in plain.text(API_KEY)


def test_exceptions_become_type_and_place_never_a_traceback() -> None:
    try:
        raise ValueError(f"SELECT * FROM t WHERE pw='{DB_PASSWORD}'")
    except ValueError as exc:
        error = exc
    event = summarise_exception(None, "error", {"event": "failed", "exc_info": error})
    assert event["error_type"] == "ValueError"
    assert event["error_where"].startswith("test_log_pipeline.py:")
    assert "exc_info" not in event
    assert summarise_exception(None, "info", {"event": "fine"}) == {"event": "fine"}


def test_stdlib_records_render_as_one_redacted_json_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    handler = build_handler(settings(log_format="json"))
    logger = logging.getLogger("tests.pipeline")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("driver said password %s for %s", DB_PASSWORD, "app")
    finally:
        logger.removeHandler(handler)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == f"driver said password {REDACTED} for app"
    assert record["level"] == "error"
    assert record["logger"] == "tests.pipeline"
    assert record["error_type"] == "RuntimeError"
    assert "Traceback" not in lines[0]


def test_development_logs_are_readable_console_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(settings(environment="development", log_level="INFO"))
    try:
        structlog.get_logger("tests.console").info("hello", who="dev")
        out = capsys.readouterr().out
    finally:
        configure_logging(settings(log_level="WARNING"))
    assert "hello" in out
    assert "who=dev" in out
    assert not out.lstrip().startswith("{")


def test_configure_logging_replaces_its_own_handler_only() -> None:
    root = logging.getLogger()
    foreign = logging.StreamHandler(sys.stderr)
    root.addHandler(foreign)
    try:
        configure_logging(settings(log_level="WARNING"))
        configure_logging(settings(log_level="WARNING"))
        ours = [h for h in root.handlers if getattr(h, "_fastapi_app_handler", False)]
        assert len(ours) == 1
        assert foreign in root.handlers
    finally:
        root.removeHandler(foreign)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"x-request-id", b"abcdefgh")], ("abcdefgh", "abcdefgh")),
        ([(b"x-correlation-id", b"corr-1234")], ("corr-1234", "corr-1234")),
        (
            [(b"x-request-id", b"req-12345"), (b"x-correlation-id", b"corr-1234")],
            ("req-12345", "corr-1234"),
        ),
        ([(b"x-request-id", b"bad id!"), (b"x-correlation-id", b"corr-1234")], ("corr-1234",) * 2),
    ],
)
def test_pick_ids(headers: list[tuple[bytes, bytes]], expected: tuple[str, str]) -> None:
    assert pick_ids(headers) == expected


def test_pick_ids_generates_when_nothing_valid() -> None:
    request_id, correlation_id = pick_ids([(b"x-request-id", b"<script>")])
    assert len(request_id) == 32
    assert correlation_id == request_id
