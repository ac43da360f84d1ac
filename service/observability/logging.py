"""Structured logs: one pipeline for structlog and the standard library.

Every log line of the process (ours, uvicorn's, gunicorn's, SQLAlchemy's) leaves through one
handler on the root logger whose ``structlog.stdlib.ProcessorFormatter`` runs the same processors:
context variables (the request id), level, logger name, UTC timestamp, exception summary and
redaction, then JSON (one object per line) or, in development, a readable console format.

Redaction runs on every event, not just ours, because a secret can reach a log line from anywhere
(a driver error quoting a URL, a debug line dumping headers):

- keys that name credentials (``authorization``, ``x-api-key``, ``cookie``, the gateway header,
  anything called password/secret/token) have their values replaced by ``***``;
- any string containing a configured secret (``Settings.secret_values()``), an API key
  (``fa_<prefix>_<secret>``: the prefix stays) or a bearer token is masked in place.

Tracebacks never reach the output: an exception becomes ``error_type`` and ``error_where``
(file:line). Driver messages can carry SQL and parameter values; the traceback goes to Sentry.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from service.settings import Settings

REDACTED = "***"
SENSITIVE_KEY_PARTS = ("password", "passwd", "secret", "token", "api_key", "apikey")
SENSITIVE_KEYS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "cookie", "set-cookie", "dsn"}
)
# API keys keep their public prefix (it is what operators search for); the secret part goes.
# One pattern for both shapes: every string of every log line is scanned, so one scan, not two.
_CREDENTIALS = re.compile(
    r"\b(?P<prefix>fa_[a-z0-9]{12}_)[A-Za-z0-9_\-]{8,}"
    r"|(?i:\b(?P<scheme>bearer\s+))[A-Za-z0-9._~+/\-]+=*"
)
_QUIET_LOGGERS = {
    "uvicorn.access": logging.CRITICAL + 1,
    "sqlalchemy": logging.WARNING,
    "alembic": logging.WARNING,
}
_HANDLER_MARK = "_fastapi_app_handler"


class Redactor:
    """A structlog processor masking credentials by key and secret values wherever they occur."""

    def __init__(self, secrets: Iterable[str], *, extra_keys: Iterable[str] = ()) -> None:
        self.keys = SENSITIVE_KEYS | {key.lower() for key in extra_keys}
        patterns = [re.escape(value) for value in sorted(set(secrets), key=len, reverse=True)]
        self._secrets = re.compile("|".join(patterns)) if patterns else None
        # Log lines reuse a small set of keys; the answer per key never changes.
        self._key_verdicts: dict[str, bool] = {}

    def is_sensitive_key(self, key: str) -> bool:
        verdict = self._key_verdicts.get(key)
        if verdict is None:
            lowered = key.lower()
            verdict = lowered in self.keys or any(part in lowered for part in SENSITIVE_KEY_PARTS)
            if len(self._key_verdicts) < 10_000:  # bounded, should a caller log computed keys
                self._key_verdicts[key] = verdict
        return verdict

    def text(self, value: str) -> str:
        # Configured secrets first and on their own: a credential pattern starting earlier in
        # the string must not swallow part of a secret and leave the rest of it in the line.
        if self._secrets is not None:
            value = self._secrets.sub(REDACTED, value)
        return _CREDENTIALS.sub(_mask_credential, value)

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return self.mapping(value)
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(item) for item in value]
        if isinstance(value, bytes):
            return self.text(value.decode("utf-8", "replace"))
        return value

    def mapping(self, values: Mapping[Any, Any]) -> dict[Any, Any]:
        return {
            key: REDACTED
            if isinstance(key, str) and self.is_sensitive_key(key) and value is not None
            else self.value(value)
            for key, value in values.items()
        }

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        for key, value in event_dict.items():
            if key.startswith("_"):  # structlog's bookkeeping (the LogRecord)
                continue
            if self.is_sensitive_key(key) and value is not None:
                event_dict[key] = REDACTED
            elif isinstance(value, str):
                event_dict[key] = self.text(value)
            elif value is not None and not isinstance(value, int | float | bool):
                event_dict[key] = self.value(value)
        return event_dict


def _mask_credential(match: re.Match[str]) -> str:
    return (match["prefix"] or match["scheme"]) + REDACTED


def summarise_exception(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    """Replace ``exc_info`` with the exception's type and where it was raised."""
    exc_info = event_dict.pop("exc_info", None)
    event_dict.pop("stack_info", None)
    if not exc_info:
        return event_dict
    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if isinstance(exc_info, tuple) and exc_info[0] is not None:
        event_dict.setdefault("error_type", exc_info[0].__name__)
        event_dict.setdefault("error_where", _where(exc_info[2]))
    return event_dict


def _where(tb: TracebackType | None) -> str:
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "unknown"
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}"


def _orjson_dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=str).decode()


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stdout`` is now (pytest capture, gunicorn redirection)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, value: TextIO) -> None:  # the base class assigns it; the property wins
        pass


def shared_processors(settings: Settings) -> list[Processor]:
    redactor = Redactor(settings.secret_values(), extra_keys=[settings.gateway_secret_header])
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        summarise_exception,
        redactor,
    ]


def build_renderer(settings: Settings) -> Processor:
    if settings.resolved_log_format == "json":
        return structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    return structlog.dev.ConsoleRenderer(
        colors=sys.stdout.isatty(), exception_formatter=structlog.dev.plain_traceback
    )


def build_handler(settings: Settings) -> logging.StreamHandler:  # type: ignore[type-arg]
    """The single stdout handler every logger of the process writes through."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared_processors(settings),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            build_renderer(settings),
        ],
    )
    handler = _StdoutHandler()
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    return handler


def configure_logging(settings: Settings) -> logging.StreamHandler:  # type: ignore[type-arg]
    """(Re)configure process-wide logging from settings; safe to call more than once.

    Logging is process state by nature; calling this again (tests build many apps) swaps our
    handler and leaves handlers installed by others (pytest's capture) alone.
    """
    handler = build_handler(settings)
    level = logging.getLevelName(settings.log_level)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, _HANDLER_MARK, False):
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # Servers attach handlers of their own; send everything through ours instead.
    for name in ("uvicorn", "uvicorn.error", "gunicorn", "gunicorn.error", "sqlalchemy"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for name, quiet_level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(quiet_level, level))
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared_processors(settings),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: loggers bound at import (module-level ``log``) must follow a reconfiguration.
        cache_logger_on_first_use=False,
    )
    return handler


class _HandlerLines:
    """structlog's output for a logger that skips the standard library: each rendered line is
    written to ``handler``'s stream under its lock, so it never interleaves with a line written
    through the handler by another thread."""

    def __init__(self, handler: logging.StreamHandler, name: str) -> None:  # type: ignore[type-arg]
        self.handler = handler
        self.name = name  # what ``add_logger_name`` reads

    def msg(self, line: str) -> None:
        handler = self.handler
        with handler.lock:  # type: ignore[union-attr]
            handler.stream.write(line + "\n")
            handler.flush()

    debug = info = warning = error = critical = msg


def direct_logger(
    settings: Settings,
    handler: logging.StreamHandler,  # type: ignore[type-arg]
    name: str,
) -> Any:
    """A logger for one hot line (the access line): the same processors, redaction and renderer
    as every other line, written through the same handler, without the standard library's
    ``LogRecord`` and formatter pass (about half of what a line cost, profiled).

    Levels follow ``LOG_LEVEL`` as for the stdlib loggers. The logger is cached: it is built
    with the app, which is rebuilt when the settings change.
    """
    return structlog.wrap_logger(
        _HandlerLines(handler, name),
        processors=[*shared_processors(settings), build_renderer(settings)],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(settings.log_level)
        ),
        cache_logger_on_first_use=True,
    )


def route_logger_through(handler: logging.Handler, loggers: Iterable[logging.Logger]) -> None:
    """Point loggers that do not propagate (gunicorn's) at our handler."""
    for logger in loggers:
        for existing in list(logger.handlers):
            logger.removeHandler(existing)
        logger.addHandler(handler)
        logger.propagate = False
