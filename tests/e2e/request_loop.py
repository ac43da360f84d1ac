"""A steady request loop against the API, run inside the cluster by tests/e2e/run.sh.

It runs in a pod of the app's own image (Python and httpx are there), through the Service, the
way in-cluster clients and the ingress controller reach the pods, while the script upgrades and
rolls back the release. Every request must succeed: any transport error or unexpected status
is a failure. Each request uses a fresh connection, as a load balancer spreading requests over
endpoints would, so a pod leaving the endpoints is noticed at once.

Stops when ``--stop-file`` appears (``kubectl exec … touch``) or after ``--max-seconds``;
prints one JSON line per ``--report-every`` seconds and a final one, and exits 1 if anything
failed (or nothing was sent).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from pathlib import Path

import httpx


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--stop-file", default="/tmp/stop")
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--max-seconds", type=float, default=1200)
    parser.add_argument("--report-every", type=float, default=5)
    args = parser.parse_args()

    headers = {"X-API-Key": os.environ["API_KEY"]}
    if os.environ.get("GATEWAY_SHARED_SECRET"):
        headers["X-Gateway-Secret"] = os.environ["GATEWAY_SHARED_SECRET"]
    client = httpx.Client(
        base_url=args.url,
        headers=headers,
        timeout=10,
        limits=httpx.Limits(max_keepalive_connections=0),
    )
    counts = {"requests": 0, "failures": 0}
    failures: list[str] = []

    def attempt(method: str, path: str, expected: int, **kwargs: object) -> httpx.Response | None:
        counts["requests"] += 1
        try:
            response = client.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            counts["failures"] += 1
            failures.append(f"{time.strftime('%H:%M:%S')} {method} {path}: {exc!r}")
            return None
        if response.status_code != expected:
            counts["failures"] += 1
            failures.append(
                f"{time.strftime('%H:%M:%S')} {method} {path}: {response.status_code} "
                f"{response.text[:200]}"
            )
            return None
        return response

    def report(final: bool = False) -> None:
        print(json.dumps({**counts, "final": final, "failed": failures[:20]}), flush=True)

    started = last_report = time.monotonic()
    stop = Path(args.stop_file)
    while not stop.exists() and time.monotonic() - started < args.max_seconds:
        created = attempt(
            "POST",
            "/v1/tasks",
            201,
            json={"title": f"e2e {uuid.uuid4()}"},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
        if created is not None:
            attempt("GET", f"/v1/tasks/{created.json()['id']}", 200)
        if time.monotonic() - last_report >= args.report_every:
            report()
            last_report = time.monotonic()
        time.sleep(args.interval)
    report(final=True)
    return 0 if counts["requests"] and not counts["failures"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
