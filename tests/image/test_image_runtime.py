"""The built image, run as the chart runs it: migrate, then serve on a read-only root with only
/tmp writable, as UID 10001 and as an arbitrary UID with GID 0 (OpenShift's restricted SCC)."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from service.migrate import head_revisions
from testkit import libpq_url, wait_until

from .image_engine import Engine
from .imagekit import ARBITRARY_USER, GATEWAY_SECRET, IMAGE_UID, Migration, Served, start_served

pytestmark = pytest.mark.image

E2E_DIR = Path(__file__).resolve().parents[1] / "e2e"

_WRITABLE_SCRIPT = r"""
import json, os, stat
skip = ("/proc", "/sys", "/dev")
writable = {}
for root, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
    probe = os.path.join(root, ".write-probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError:
        pass
    else:
        os.unlink(probe)
        writable[root] = os.stat(root).st_mode
    for name in files:
        path = os.path.join(root, name)
        if not os.path.islink(path) and os.access(path, os.W_OK):
            writable[path] = os.stat(path).st_mode
print(json.dumps(writable))
"""


def parse_json_lines(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON log line: {line[:300]!r}") from None
        assert isinstance(record, dict), line
        records.append(record)
    return records


def writable_paths(result: Any) -> dict[str, int]:
    assert result.returncode == 0, result.stdout + result.stderr
    found: dict[str, int] = json.loads(result.stdout)
    return found


# --- migrate -----------------------------------------------------------------------------------
def test_migrate_upgrades_an_empty_database_and_logs_json(
    migration: Migration, migrated_database: str
) -> None:
    records = parse_json_lines(migration.stdout + "\n" + migration.stderr)
    assert records, "migrate said nothing"
    assert all({"event", "level"} <= set(record) for record in records), records
    assert not [r for r in records if r["level"] in {"error", "critical"}], records

    async def current() -> set[str]:
        url = libpq_url(migrated_database)
        conn = await asyncpg.connect(url)
        try:
            return {row[0] for row in await conn.fetch("SELECT version_num FROM alembic_version")}
        finally:
            await conn.close()

    assert asyncio.run(current()) == head_revisions()


# --- serve ---------------------------------------------------------------------------------------
@pytest.fixture(
    scope="module", params=[IMAGE_UID, ARBITRARY_USER], ids=["uid-10001", "uid-arbitrary-gid-0"]
)
def served(
    request: pytest.FixtureRequest, engine: Engine, image: str, migrated_database: str
) -> Iterator[Served]:
    user = request.param if request.param != IMAGE_UID else None  # None: the image's USER
    server = start_served(engine, image, migrated_database, user)
    try:

        def ready() -> bool:
            if not engine.state(server.name).get("Running"):
                raise AssertionError(f"the container exited:\n{server.logs()[-4000:]}")
            return httpx.get(f"{server.url}/health/ready", timeout=5).status_code == 200

        try:
            wait_until(ready, timeout=90, interval=0.5, what="/health/ready in the container")
        except TimeoutError:
            raise AssertionError(f"never ready:\n{server.logs()[-4000:]}") from None
        yield server
    finally:
        engine.remove(server.name)


def test_serves_as_the_intended_user_with_gunicorn_as_pid_1(served: Served) -> None:
    ids = served.engine.exec(
        served.name, "python", "-c", "import os; print(os.getuid(), os.getgid())"
    )
    uid, gid = ids.stdout.split()
    expected_uid, _, expected_gid = (
        served.user.partition(":") if ":" in served.user else (served.user, "", "10001")
    )
    assert (uid, gid) == (expected_uid, expected_gid)
    cmdline = served.engine.exec(served.name, "cat", "/proc/1/cmdline").stdout
    assert "gunicorn" in cmdline, "serve execs gunicorn: PID 1 gets the engine's SIGTERM"


def test_smoke_command_passes_against_it(
    served: Served, engine: Engine, image: str, api_key: str
) -> None:
    result = engine.run(
        image,
        [
            "smoke",
            "--url",
            served.url,
            "--api-key",
            api_key,
            "--metrics-url",
            served.metrics_url,
            "--header",
            f"X-Gateway-Secret: {GATEWAY_SECRET}",
            "--ready-timeout",
            "30",
        ],
        user=None if served.user == IMAGE_UID else served.user,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("smoke passed")
    assert "ok   POST /v1/tasks" in result.stdout


def test_metrics_answer_on_the_metrics_port_only(served: Served) -> None:
    metrics = httpx.get(served.metrics_url, timeout=10)
    assert metrics.status_code == 200
    assert "# TYPE http_requests_total counter" in metrics.text
    assert "db_up" in metrics.text
    api = httpx.get(f"{served.url}/metrics", timeout=10)
    assert api.status_code != 200
    assert "# TYPE" not in api.text


_PROBE_DEFAULT_PORTS = r"""
import json, urllib.error, urllib.request
found = {}
for name, url in (("api", "http://127.0.0.1:8000/health/live"),
                  ("ready", "http://127.0.0.1:8000/health/ready"),
                  ("metrics", "http://127.0.0.1:9000/metrics")):
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            found[name] = [response.status, response.read().decode()[:4000]]
    except urllib.error.HTTPError as error:
        found[name] = [error.code, ""]
print(json.dumps(found))
"""


def test_the_image_defaults_serve_the_api_on_8000_and_metrics_on_9000(
    engine: Engine, image: str
) -> None:
    """With nothing but the required secrets, in a network namespace of its own (loopback
    only, so the image's HOST=0.0.0.0 reaches nothing else): the ports the chart, the Service
    and Prometheus assume. The database is unreachable there, so readiness says 503."""
    name = engine.start(
        image,
        env={
            "DATABASE_URL": "postgresql://app:unused@127.0.0.1:1/app",
            "GATEWAY_SHARED_SECRET": GATEWAY_SECRET,
            "WEB_CONCURRENCY": "1",
        },
        network="none",
    )
    try:

        def answers() -> dict[str, list[Any]] | None:
            probe = engine.exec(name, "python", "-c", _PROBE_DEFAULT_PORTS)
            if probe.returncode != 0:
                return None
            found: dict[str, list[Any]] = json.loads(probe.stdout)
            return found

        found = wait_until(answers, timeout=90, interval=1, what="ports 8000 and 9000")
    finally:
        logs = engine.logs(name)
        engine.remove(name)
    assert found["api"][0] == 200, logs[-3000:]
    assert found["metrics"][0] == 200
    assert "# TYPE http_requests_total counter" in found["metrics"][1]
    assert found["ready"][0] == 503, "not ready without its database"


def test_only_tmp_is_writable(served: Served) -> None:
    found = writable_paths(served.engine.exec(served.name, "python", "-c", _WRITABLE_SCRIPT))
    assert "/tmp" in found, "the emptyDir/tmpfs on /tmp is the app's scratch space"
    outside = sorted(path for path in found if path != "/tmp" and not path.startswith("/tmp/"))
    assert outside == [], f"writable outside /tmp as {served.user}: {outside[:20]}"
    # serve created its metrics directory there, and wrote the workers' files into it.
    assert any(path.startswith("/tmp/prometheus-multiproc/") for path in found), sorted(found)


def test_healthcheck_command_succeeds_and_can_fail(
    served: Served, engine: Engine, config_healthcheck: list[str]
) -> None:
    if engine.name == "podman":
        result = engine("healthcheck", "run", served.name, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    command = config_healthcheck
    result = engine.exec(served.name, *command)
    assert result.returncode == 0, result.stdout + result.stderr
    # Pointed at a port nothing listens on, the same command fails: it checks, it is no no-op.
    closed = engine.exec(served.name, *command, env={"PORT": "1"})
    assert closed.returncode != 0


def test_logs_are_json_lines(served: Served) -> None:
    httpx.get(f"{served.url}/health/live", timeout=10)
    records = parse_json_lines(served.logs())
    assert records
    assert not [r for r in records if r["level"] in {"error", "critical"}], records


@pytest.fixture(scope="module")
def config_healthcheck(engine: Engine, image: str) -> list[str]:
    health = engine.healthcheck(image)
    assert health is not None
    test = health["Test"]
    assert test[0] == "CMD"
    return list(test[1:])


# The script, not the user, is under test here: one server is enough.
@pytest.mark.parametrize("served", [IMAGE_UID], indirect=True, ids=["uid-10001"])
def test_the_e2e_request_loop_runs_in_the_image(
    served: Served, engine: Engine, image: str, api_key: str
) -> None:
    """tests/e2e/request_loop.py, which the e2e run starts in a pod of this image, works with
    what the image has and counts a failure as a failure."""

    def loop(key: str) -> subprocess.CompletedProcess[str]:
        return engine.run(
            image,
            ["/e2e/request_loop.py", "--url", served.url, "--max-seconds", "2"],
            entrypoint="python",
            env={"API_KEY": key, "GATEWAY_SHARED_SECRET": GATEWAY_SECRET},
            mounts={E2E_DIR: "/e2e"},
        )

    good = loop(api_key)
    assert good.returncode == 0, good.stdout + good.stderr
    final = json.loads(good.stdout.strip().splitlines()[-1])
    assert final["final"] is True
    assert final["requests"] > 0
    assert final["failures"] == 0
    bad = loop("fa_aaaaaaaaaaaa_" + "b" * 43)
    assert bad.returncode == 1
    final = json.loads(bad.stdout.strip().splitlines()[-1])
    assert final["failures"] == final["requests"] > 0
    assert " 401 " in final["failed"][0]


# --- the image's own permissions (no read-only root) ----------------------------------------------
@pytest.mark.parametrize("user", [None, ARBITRARY_USER], ids=["uid-10001", "uid-arbitrary-gid-0"])
def test_code_and_venv_are_not_writable_even_on_a_writable_root(
    engine: Engine, image: str, user: str | None
) -> None:
    """OpenShift and plain `docker run` may give a writable root: the image's own permissions
    still keep the app from changing its code, venv or system files."""
    result = engine.run(
        image, ["-c", _WRITABLE_SCRIPT], user=user, read_only=False, entrypoint="python"
    )
    found = writable_paths(result)
    # World-writable sticky directories (/var/tmp, /run/lock) are the base's temp dirs.
    temp_dirs = {
        path
        for path, mode in found.items()
        if stat.S_ISDIR(mode) and mode & stat.S_ISVTX and mode & 0o777 == 0o777
    }
    outside = sorted(
        path
        for path in found
        if path not in temp_dirs and path != "/tmp" and not path.startswith("/tmp/")
    )
    assert outside == [], f"writable by {user or IMAGE_UID}: {outside[:20]}"
    # Where `serve` creates the metrics directory, as either user.
    assert "/tmp" in found
