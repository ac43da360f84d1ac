"""Optional error reporting to Sentry (SENTRY_DSN); off when the variable is unset.

Sentry is where tracebacks go (logs carry only the exception type and location), so what leaves
the process is scrubbed first: no request bodies, no cookies, no credential headers, no local
variables (a key or token can sit in one), and every string in the event (exception messages,
breadcrumbs from log lines, URLs) has configured secrets, API keys and bearer tokens masked by
the same redactor the logs use.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from service.observability.logging import Redactor
from service.settings import Settings

Event = dict[str, Any]


def make_scrubber(settings: Settings) -> Callable[[Any, Any], Any]:
    redactor = Redactor(settings.secret_values(), extra_keys=[settings.gateway_secret_header])

    def scrub(event: Any, hint: Any) -> Any:
        request = event.get("request")
        if isinstance(request, dict):
            request.pop("data", None)
            request.pop("cookies", None)
            headers = request.get("headers")
            if isinstance(headers, dict):
                request["headers"] = {
                    name: value
                    for name, value in headers.items()
                    if not redactor.is_sensitive_key(name)
                }
        scrubbed: Event = redactor.mapping(event)
        return scrubbed

    return scrub


def init_sentry(settings: Settings) -> bool:
    """Start the Sentry client when SENTRY_DSN is set; True when it did."""
    if settings.sentry_dsn is None:
        return False
    # Imported only when it is used: the SDK is ~0.3 s of every start.
    import sentry_sdk
    from sentry_sdk.integrations.logging import LoggingIntegration

    scrub = make_scrubber(settings)
    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        environment=settings.environment.value,
        release=settings.version,
        traces_sample_rate=settings.sentry_traces_sample_rate,
        # send_default_pii is deprecated in this SDK; left unset it means False (no user data,
        # cookies or headers collected by default) and keeps the SDK's own EventScrubber on.
        max_request_body_size="never",
        include_local_variables=False,
        before_send=scrub,
        before_send_transaction=scrub,
        # Log lines become breadcrumbs only; errors are captured explicitly (errors.py), so a
        # logged error does not turn into a second event.
        integrations=[LoggingIntegration(level=logging.INFO, event_level=None)],
    )
    return True


def capture_exception(error: BaseException) -> None:
    """Send ``error`` to Sentry when the client was started (``init_sentry``), else nothing.

    Without SENTRY_DSN the SDK is never imported, and there is nowhere to send it to.
    """
    sdk = sys.modules.get("sentry_sdk")
    if sdk is not None:
        sdk.capture_exception(error)
