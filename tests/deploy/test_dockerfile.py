"""The container image definition: `.docker/Dockerfile` and `.dockerignore`, read statically.

Checked here without a container engine: hadolint; a parser-level reading of the Dockerfile
that asserts the runtime contract (non-root UID, pinned base, no compilers, ports, probes,
entrypoint); and `test_image_start_command_serves`, which rebuilds the image's venv the way the
builder stage does (`uv sync --frozen --no-dev --no-default-groups` from uv.lock) and runs the
image's exact ENTRYPOINT + CMD as an unprivileged user against a real PostgreSQL, with the code
read-only and HOME unusable, then checks it serves and wrote nothing outside /tmp. The image
itself is built (`make image`) and run by tests/image/; the release build, scan and push happen
in `.github/workflows/release.yml`.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from testkit import UV_SYNC, free_port, require_binary, wait_until
from tools.kit import drop_to, system_user

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / ".docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


# --- a small Dockerfile reader --------------------------------------------------------------------
@dataclass
class Instruction:
    keyword: str
    value: str
    stage: int
    flags: list[str] = field(default_factory=list)

    def json_args(self) -> list[str]:
        parsed = json.loads(self.value)
        assert isinstance(parsed, list), f"{self.keyword} must use the exec (JSON) form"
        return [str(item) for item in parsed]


_FLAG = re.compile(r"^(--[a-z-]+(?:=\S+)?)\s+")


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuations joined and comments dropped (as BuildKit does)."""
    instructions: list[Instruction] = []
    stage = -1
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue  # comment lines inside a continuation are removed by the parser
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        keyword, _, rest = buffer.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        flags: list[str] = []
        while match := _FLAG.match(rest):
            flags.append(match.group(1))
            rest = rest[match.end() :]
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, rest, stage, flags))
        buffer = ""
    return instructions


def env_of(instructions: list[Instruction], stage: int) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in instructions:
        if item.stage == stage and item.keyword == "ENV":
            for token in shlex.split(item.value):
                name, sep, value = token.partition("=")
                assert sep, f"use ENV KEY=value, not the legacy form: {item.value!r}"
                env[name] = value
    return env


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def runtime_stage(instructions: list[Instruction]) -> int:
    return max(item.stage for item in instructions)


def of_stage(instructions: list[Instruction], stage: int, keyword: str) -> list[Instruction]:
    return [item for item in instructions if item.stage == stage and item.keyword == keyword]


# --- hadolint ----------------------------------------------------------------------------------
def test_hadolint_clean() -> None:
    hadolint = require_binary("hadolint", hint=UV_SYNC)
    result = subprocess.run(
        [hadolint, "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], json.dumps(findings, indent=2)
    assert result.returncode == 0, result.stderr


def test_every_hadolint_ignore_is_justified() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            before = lines[number - 1] if number else ""
            justified = before.strip().startswith("#") and "hadolint" not in before
            assert justified, f"line {number + 1}: say why the rule is ignored, above it"
    assert (
        not (ROOT / ".hadolint.yaml").exists()
        or "ignored" not in (ROOT / ".hadolint.yaml").read_text()
    ), "ignore rules next to the instruction they concern, with a reason"


# --- structure -----------------------------------------------------------------------------------
_PINNED_PYTHON = re.compile(r"^python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?$")


def test_multi_stage_on_the_same_pinned_slim_base(instructions: list[Instruction]) -> None:
    froms = [item for item in instructions if item.keyword == "FROM"]
    assert len(froms) >= 2, "builder + runtime stages"
    images = [item.value.split()[0] for item in froms]
    for image in images:
        assert _PINNED_PYTHON.match(image), f"{image}: pin an exact patch of the slim image"
        assert "latest" not in image
    assert len(set(images)) == 1, "the venv is built for and run on the same interpreter"
    names = [item.value.split()[-1] for item in froms]
    assert names[0] == "builder"
    assert froms[-1].value.split()[-2].upper() == "AS"


def test_builder_installs_the_lock_with_uv(instructions: list[Instruction]) -> None:
    builder = 0
    copies = " ".join(item.value for item in of_stage(instructions, builder, "COPY"))
    uv_copy = [
        item
        for item in of_stage(instructions, builder, "COPY")
        if any(flag.startswith("--from=ghcr.io/astral-sh/uv:") for flag in item.flags)
    ]
    assert uv_copy, "uv comes from its official image, pinned"
    tag = uv_copy[0].flags[0].rsplit(":", 1)[1]
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag), f"pin uv to an exact version, not {tag!r}"
    env = env_of(instructions, builder)
    assert env.get("UV_COMPILE_BYTECODE") == "1"
    assert env.get("UV_LINK_MODE") == "copy"
    assert env.get("UV_PROJECT_ENVIRONMENT") == "/app/.venv"
    runs = of_stage(instructions, builder, "RUN")
    syncs = [item for item in runs if "uv sync" in item.value]
    assert len(syncs) == 2, "dependencies first (cached layer), then the project"
    deps, project = syncs
    for item in syncs:
        assert "--frozen" in item.value, "install exactly uv.lock"
        # No test, lint or deploy tooling in the image (default-groups would add them).
        assert "--no-dev" in item.value
        assert "--no-default-groups" in item.value
        assert "--mount=type=cache,target=/root/.cache/uv" in item.flags
    assert "--no-install-project" in deps.value
    assert "--no-install-project" not in project.value
    assert "service" in copies
    assert "uv.lock" in copies


def test_builds_with_buildkit_and_buildah_alike(instructions: list[Instruction]) -> None:
    """Relative mount targets are a BuildKit extension buildah (OpenShift's builder) rejects,
    and a `# syntax=` line makes an offline BuildKit pull a frontend image."""
    first = DOCKERFILE.read_text().lstrip().splitlines()[0]
    assert not first.lower().replace(" ", "").startswith("#syntax="), first
    mounts = [flag for item in instructions for flag in item.flags if flag.startswith("--mount=")]
    assert mounts
    for flag in mounts:
        options = dict(part.split("=", 1) for part in flag[len("--mount=") :].split(","))
        assert options["target"].startswith("/"), f"{flag}: use an absolute target"


def test_runtime_stage_has_no_build_tools(
    instructions: list[Instruction], runtime_stage: int
) -> None:
    runtime = [item for item in instructions if item.stage == runtime_stage]
    text = " ".join(f"{item.keyword} {' '.join(item.flags)} {item.value}" for item in runtime)
    for forbidden in (
        "gcc",
        "build-essential",
        "g++",
        "clang",
        "make ",
        "libpq-dev",
        "astral-sh/uv",
    ):
        assert forbidden not in text, f"{forbidden!r} in the runtime stage"
    copies = of_stage(instructions, runtime_stage, "COPY")
    assert any(
        "--from=builder" in item.flags and item.value.startswith("/app/.venv") for item in copies
    )
    assert any(
        "--from=builder" in item.flags and item.value.startswith("/app/service") for item in copies
    )
    for item in copies:
        assert not any(flag.startswith("--chown=10001") for flag in item.flags), (
            "code and venv stay root-owned: the app user must not be able to modify them"
        )


def test_runs_as_numeric_non_root_user(instructions: list[Instruction], runtime_stage: int) -> None:
    users = of_stage(instructions, runtime_stage, "USER")
    assert users, "the runtime stage must set USER"
    user, _, group = users[-1].value.partition(":")
    assert user.isdigit(), "numeric USER lets Kubernetes verify runAsNonRoot"
    assert int(user) >= 10000
    assert not group or (group.isdigit() and int(group) >= 10000)
    creates = " ".join(item.value for item in of_stage(instructions, runtime_stage, "RUN"))
    assert f"useradd --system --uid {user}" in creates


def test_ports_and_environment(instructions: list[Instruction], runtime_stage: int) -> None:
    exposed = {
        port
        for item in of_stage(instructions, runtime_stage, "EXPOSE")
        for port in item.value.split()
    }
    assert exposed == {"8000", "9000"}
    env = env_of(instructions, runtime_stage)
    expected = {
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "PROMETHEUS_MULTIPROC_DIR": "/tmp/prometheus-multiproc",
        "HOST": "0.0.0.0",
        "PORT": "8000",
        "ENVIRONMENT": "production",
    }
    for name, value in expected.items():
        assert env.get(name) == value, f"ENV {name}={value}"
    assert env["PATH"].startswith("/app/.venv/bin:")


def test_healthcheck_needs_no_curl(instructions: list[Instruction], runtime_stage: int) -> None:
    checks = of_stage(instructions, runtime_stage, "HEALTHCHECK")
    assert len(checks) == 1
    value = checks[0].value
    assert value.startswith("CMD ")
    command = json.loads(value[len("CMD ") :])
    assert command[:2] == ["python", "-c"]
    assert "/health/live" in command[2]
    assert "urllib" in command[2]
    assert "curl" not in value
    assert "wget" not in value
    flags = " ".join(checks[0].flags)
    assert "--timeout=" in flags
    assert "--interval=" in flags


def test_healthcheck_command_is_valid_python(
    instructions: list[Instruction], runtime_stage: int
) -> None:
    value = of_stage(instructions, runtime_stage, "HEALTHCHECK")[0].value
    source = json.loads(value[len("CMD ") :])[2]
    compile(source, "<HEALTHCHECK>", "exec")


def test_entrypoint_and_cmd(instructions: list[Instruction], runtime_stage: int) -> None:
    entrypoint = of_stage(instructions, runtime_stage, "ENTRYPOINT")
    cmd = of_stage(instructions, runtime_stage, "CMD")
    assert entrypoint[-1].json_args() == ["python", "-m", "service"]
    assert cmd[-1].json_args() == ["serve"]


def test_oci_labels_from_build_args(instructions: list[Instruction], runtime_stage: int) -> None:
    args = {item.value.split("=")[0] for item in of_stage(instructions, runtime_stage, "ARG")}
    labels = " ".join(item.value for item in of_stage(instructions, runtime_stage, "LABEL"))
    for key, arg in (("version", "VERSION"), ("revision", "REVISION"), ("created", "CREATED")):
        assert f'org.opencontainers.image.{key}="${{{arg}}}"' in labels
        assert arg in args
    assert "org.opencontainers.image.title=" in labels


# --- .dockerignore -------------------------------------------------------------------------------
def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per line, with Docker's semantics: `*` stays in one path segment, `**`
    crosses segments, and a pattern that matches a directory matches everything under it."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:] if negated else line
        pattern = pattern.strip("/")
        regex = ""
        index = 0
        while index < len(pattern):
            if pattern.startswith("**/", index):
                regex += "(?:.*/)?"
                index += 3
            elif pattern.startswith("**", index):
                regex += ".*"
                index += 2
            elif pattern[index] == "*":
                regex += "[^/]*"
                index += 1
            elif pattern[index] == "?":
                regex += "[^/]"
                index += 1
            elif pattern[index] == "[":
                end = pattern.index("]", index)
                regex += pattern[index : end + 1]
                index = end + 1
            else:
                regex += re.escape(pattern[index])
                index += 1
        rules.append((negated, re.compile(regex + "(?:/.*)?")))
    return rules


def excluded_from_context(path: str) -> bool:
    excluded = False
    for negated, regex in _dockerignore_rules():
        if regex.fullmatch(path):
            excluded = not negated
    return excluded


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        ".data/postgres/PG_VERSION",
        "tests/conftest.py",
        "service/__pycache__/app.cpython-311.pyc",
        "__pycache__/x.pyc",
        ".env.production",
        "charts/fastapi-app/Chart.yaml",
        ".github/workflows/ci.yml",
    ],
)
def test_dockerignore_excludes(path: str) -> None:
    assert excluded_from_context(path), path


def test_dockerignore_keeps_what_the_build_copies(instructions: list[Instruction]) -> None:
    needed = ["pyproject.toml", "uv.lock", "README.md"]
    needed += [
        str(path.relative_to(ROOT))
        for path in (ROOT / "service").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    assert any(path.endswith("gunicorn_conf.py") or "migrations" in path for path in needed)
    for path in needed:
        assert not excluded_from_context(path), f"{path} is needed by the build"
    copied = [
        item.value.split()[0]
        for item in instructions
        if item.keyword == "COPY" and not any(f.startswith("--from") for f in item.flags)
    ]
    for source in copied:
        for part in source.split()[:-1] or [source]:
            assert not excluded_from_context(part), f"COPY {part} is excluded by .dockerignore"


# --- the image's start command, for real ---------------------------------------------------------
TEST_USER = "fastapi-app"
IMAGE_UID = 10001


def _unprivileged_user() -> pwd.struct_passwd:
    """Ourselves when already unprivileged, else a system user like the image's (created once)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    return system_user(TEST_USER, uid=IMAGE_UID)


def _as_user(user: pwd.struct_passwd) -> dict[str, Any]:
    return drop_to(user) if os.geteuid() == 0 else {}


def _interpreter_for(user: pwd.struct_passwd) -> str:
    """A Python 3.11 the unprivileged user may execute (the repo venv's often lives under a
    0700 /root; Debian's /usr/bin/python3.11 is the same minor version as the image)."""
    candidates = [
        os.path.realpath(sys.executable),
        "/usr/local/bin/python3.11",
        "/usr/bin/python3.11",
    ]
    for candidate in candidates:
        if not Path(candidate).exists():
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 11))"],
                capture_output=True,
                text=True,
                check=False,
                env={"PATH": "/usr/bin:/bin"},
                cwd="/",
                **_as_user(user),
            )
        except PermissionError:
            continue
        if probe.stdout.strip() == "True":
            return candidate
    pytest.fail("no Python 3.11 interpreter executable by an unprivileged user")


def _files_owned_by(uid: int, allowed: tuple[str, ...]) -> set[str]:
    """Every path on the root filesystem (and the usual tmpfs mounts) owned by ``uid``, outside
    the allowed prefixes."""
    # Container storage holds image layers with files owned by the image's UID (tests/image
    # builds and runs the real image on this machine): those are not the process's writes.
    ignored = ("/proc", "/sys", "/var/lib/containers", "/run/containers", *allowed)
    prune = " -o ".join(f"-path {shlex.quote(path)}" for path in ignored)
    found: set[str] = set()
    for top in ("/", "/dev/shm", "/run"):
        if not Path(top).is_dir():
            continue
        result = subprocess.run(
            f"find {top} -xdev \\( {prune} \\) -prune -o -uid {uid} -print",
            shell=True,
            capture_output=True,
            text=True,
            check=False,
        )
        found.update(line for line in result.stdout.splitlines() if line)
    return {path for path in found if not path.startswith(allowed)}


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def image_root() -> Iterator[Path]:
    """A /tmp directory every user can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="fastapi-image-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _build_app_dir(app: Path, python: str) -> None:
    """What the builder stage does: code at /app, `uv sync` the lock into /app/.venv."""
    app.mkdir()
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy2(ROOT / name, app / name)
    shutil.copytree(
        ROOT / "service", app / "service", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    uv = require_binary("uv", hint=UV_SYNC)
    env = {
        **os.environ,
        "UV_PROJECT_ENVIRONMENT": str(app / ".venv"),
        "UV_COMPILE_BYTECODE": "1",
        "UV_LINK_MODE": "copy",
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_PYTHON": python,
    }
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(
        [uv, "sync", "--frozen", "--no-dev", "--no-default-groups", "--quiet"],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    subprocess.run(
        [str(app / ".venv/bin/python"), "-m", "compileall", "-q", "service"],
        cwd=app,
        check=True,
        capture_output=True,
    )
    # Read-only for the app user, as in the image: root owns code and venv; nothing group/other
    # writable.
    for dirpath, dirnames, filenames in os.walk(app):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            if not path.is_symlink():
                path.chmod(path.stat().st_mode & ~0o022)
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "root:root", str(app)], check=True)


@pytest.mark.stack
@pytest.mark.timeout(240)
def test_image_start_command_serves(
    instructions: list[Instruction], runtime_stage: int, image_root: Path, database_url: str
) -> None:
    user = _unprivileged_user()
    python = _interpreter_for(user)
    app = image_root / "app"
    _build_app_dir(app, python)

    entrypoint = of_stage(instructions, runtime_stage, "ENTRYPOINT")[-1].json_args()
    cmd = of_stage(instructions, runtime_stage, "CMD")[-1].json_args()
    argv = [*entrypoint, *cmd]

    metrics_dir = image_root / "prometheus-multiproc"  # the chart's emptyDir
    metrics_dir.mkdir()
    if os.geteuid() == 0:
        os.chown(metrics_dir, user.pw_uid, user.pw_gid)
    port, metrics_port = free_port(), free_port()
    image_env = env_of(instructions, runtime_stage)
    env = {
        **{k: v for k, v in image_env.items() if k != "PATH"},
        "PATH": f"{app / '.venv/bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/nonexistent",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "METRICS_PORT": str(metrics_port),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "WEB_CONCURRENCY": "2",
        "GUNICORN_GRACEFUL_TIMEOUT": "5",
        "DATABASE_URL": database_url,
        "GATEWAY_SHARED_SECRET": "image-test-gateway-secret-0123456789abcdef",
        "RATE_LIMIT_ENABLED": "false",
        "LOG_LEVEL": "INFO",
    }
    assert env["ENVIRONMENT"] == "production", "run with the image's production defaults"
    started_at = time.time()
    log_path = image_root / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            cwd=app,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **_as_user(user),
        )

    def logs() -> str:
        return log_path.read_text(errors="replace")[-4000:]

    try:

        def live_or_exited() -> bool:
            return (
                process.poll() is not None or _get(f"http://127.0.0.1:{port}/health/live")[0] == 200
            )

        try:
            wait_until(live_or_exited, timeout=60, interval=0.2, what="/health/live")
        except TimeoutError:
            raise AssertionError(f"/health/live never answered 200:\n{logs()}") from None
        assert process.poll() is None, f"exited with {process.returncode}:\n{logs()}"
        status, body = _get(f"http://127.0.0.1:{port}/health/ready", timeout=10)
        assert status == 200, body
        status, body = _get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200
        assert b"# TYPE" in body, body[:500]
        # Metrics are served on the metrics port only (the API port answers 403 without the
        # gateway secret, 404 with it: never the exposition).
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status != 200
        assert b"# TYPE" not in body
        # `serve` must exec gunicorn (so PID 1 in the container is gunicorn and gets SIGTERM).
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().replace(b"\0", b" ")
        assert b"gunicorn" in cmdline, cmdline
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
    assert process.returncode == 0, (
        f"graceful shutdown exits 0, got {process.returncode}:\n{logs()}"
    )

    if os.geteuid() == 0:
        written = _files_owned_by(user.pw_uid, ("/tmp",))
        assert not written, f"wrote outside /tmp: {sorted(written)[:20]}"
    leftovers = [p for p in app.rglob("*") if p.stat().st_mtime > started_at and p.is_file()]
    assert not leftovers, f"the app directory changed: {leftovers[:10]}"
