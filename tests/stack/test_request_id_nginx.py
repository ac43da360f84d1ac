"""One request id from edge to log line: through real nginx and gunicorn, the id a client sees in
``X-Request-ID`` is the one in the problem body, in nginx's access line and in the app's.

nginx keeps a client's id only when it follows the app's rule (``VALID_ID_PATTERN``), else it
generates one and forwards that; the app then keeps what nginx forwarded. Before issue 9 nginx
accepted 1-128 characters and the app 8-128 without ``:``, so ``abc`` was echoed in the header
while the body and the app's logs carried another id.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from service.observability.request_id import VALID_ID_PATTERN
from testkit import wait_until
from tools.stack import Stack

pytestmark = pytest.mark.stack

IDS = [
    ("abc", False),  # shorter than the rule
    ("req:2030-01-01T00:00:00:42", True),  # colons are fine for both
    ("0123456789abcdef", True),
    ("x" * 129, False),
    ("has space", False),
    ("a;b=c", False),
]


def _json_lines(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def _logged_ids(stack: Stack) -> tuple[set[str], set[str]]:
    """(request ids in nginx's access lines, request ids in the apps' access lines)."""
    access_log = stack.logs_dir / "nginx-access.log"
    text = access_log.read_text(errors="replace") if access_log.exists() else ""
    nginx = {str(r.get("request_id")) for r in _json_lines(text)}
    app: set[str] = set()
    for instance in stack.instances:
        if instance.process is not None:
            text = instance.process.log_path.read_text(errors="replace")
            app |= {
                str(r["request_id"])
                for r in _json_lines(text)
                if r.get("event") == "request" and "request_id" in r
            }
    return nginx, app


def test_nginx_and_the_app_agree_on_every_request_id(stack: Stack) -> None:
    seen: list[str] = []
    for sent, kept in IDS:
        assert (re.fullmatch(VALID_ID_PATTERN, sent) is not None) is kept
        response = httpx.get(
            f"{stack.url}/no-such-route", headers={"X-Request-ID": sent}, timeout=10
        )
        assert response.status_code == 404
        header = response.headers.get_list("x-request-id")
        assert len(header) == 1, header
        body_id = response.json()["request_id"]
        assert header[0] == body_id, (sent, header, body_id)
        assert (body_id == sent) is kept, (sent, body_id)
        assert re.fullmatch(VALID_ID_PATTERN, body_id)
        seen.append(body_id)

    def logged() -> bool:
        nginx, app = _logged_ids(stack)
        return set(seen) <= nginx and set(seen) <= app

    wait_until(logged, timeout=15, interval=0.1, what="every id in nginx's and the app's logs")
