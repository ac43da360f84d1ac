"""What the built image is: its config, what is (not) inside, and how big it is above its base."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from .image_engine import STAND_IN_LABEL, Build, Engine

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[2]
# The runtime stage's base as the Dockerfile names it (Renovate bumps it there; see
# tests/deploy/test_renovate.py), so a base bump needs no edit here.
RUNTIME_BASE = re.findall(
    r"^FROM\s+(\S+)", (ROOT / ".docker" / "Dockerfile").read_text(), flags=re.MULTILINE
)[-1].split("@")[0]

# Bytes the image adds on top of its base (uncompressed, as the engine reports them): the
# locked runtime venv (mostly asyncpg, uvloop, pydantic-core, SQLAlchemy, sentry, and boto3 +
# botocore for the S3 backups, ~29 MB), the code (<1 MB) and the backup jobs' PostgreSQL 16
# pg_dump/pg_restore/psql on Debian's libpq5 (4.9 MB). Measured at 168.5 MB (163.6 MB before
# the client tools, 134.5 MB before boto3); the budget leaves ~10 % for dependency updates. A
# failure here means something new got in (a dev dependency, a cache, a second copy of the
# venv): find it with `docker history` / `podman history` before raising the budget.
ADDED_BYTES_BUDGET = 185_000_000

_CONTENTS_SCRIPT = r"""
import importlib.util, json, os, re
compiler = re.compile(
    r"^(gcc|g\+\+|cc|c\+\+|cpp|clang|clang\+\+|ld|ld\.(?:bfd|gold|lld)|as|make|cmake|rustc|cargo)"
    r"(-\d+)?$|^[\w]+-linux-gnu-(gcc|g\+\+|cpp|ld|as)(-\d+)?$"
)
found = {"compilers": [], "uv": [], "git": [], "env": []}
for root, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys", "/dev")]
    for name in dirs + files:
        path = os.path.join(root, name)
        if compiler.match(name) and os.path.isfile(path):
            found["compilers"].append(path)
        if name in ("uv", "uvx") and os.path.isfile(path):
            found["uv"].append(path)
        if name == ".git":
            found["git"].append(path)
        if name.startswith(".env"):
            found["env"].append(path)
found["app"] = sorted(os.listdir("/app"))
found["test_files"] = [
    os.path.join(root, name)
    for root, _, files in os.walk("/app/service")
    for name in files
    if name == "conftest.py" or name.startswith("test_")
]
found["dev_tools"] = [
    name for name in ("pytest", "ruff", "mypy", "uv", "coverage", "hypothesis", "helm_python")
    if importlib.util.find_spec(name) is not None
]
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def config(engine: Engine, image: str) -> dict[str, object]:
    data = engine.inspect_image(image)
    return dict(data["Config"])


@pytest.fixture(scope="module")
def contents(engine: Engine, image: str) -> dict[str, list[str]]:
    result = engine.run(image, ["-c", _CONTENTS_SCRIPT], entrypoint="python", timeout=300)
    assert result.returncode == 0, result.stderr
    found: dict[str, list[str]] = json.loads(result.stdout)
    return found


def test_the_build_says_which_engine_and_bases_and_ends_with_the_reference(build: Build) -> None:
    assert f"engine {build.engine}" in build.output
    assert f"base {RUNTIME_BASE}: " in build.output
    assert "base ghcr.io/astral-sh/uv:" in build.output
    assert build.output.rstrip().splitlines()[-1] == build.reference


def test_runtime_contract_in_the_image_config(
    config: dict[str, object], engine: Engine, image: str
) -> None:
    assert config["User"] == "10001:10001"
    assert set(config["ExposedPorts"]) == {"8000/tcp", "9000/tcp"}  # type: ignore[call-overload]
    env = dict(item.split("=", 1) for item in config["Env"])  # type: ignore[attr-defined]
    assert env["PORT"] == "8000"
    assert env["METRICS_PORT"] == "9000", "Prometheus scrapes 9000 unless told otherwise"
    assert env["ENVIRONMENT"] == "production"
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")
    assert config["Entrypoint"] == ["python", "-m", "service"]
    assert config["Cmd"] == ["serve"]
    health = engine.healthcheck(image)
    assert health is not None, "HEALTHCHECK survived the build (buildah: --format docker)"
    assert health["Test"][:3] == ["CMD", "python", "-c"], "HEALTHCHECK survived the build"


def test_labels_carry_the_commit_and_say_whether_the_bases_were_stand_ins(
    config: dict[str, object], build: Build
) -> None:
    labels = config["Labels"]
    assert isinstance(labels, dict)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    if head:
        assert labels["org.opencontainers.image.revision"] == head
    assert labels["org.opencontainers.image.created"] != "1970-01-01T00:00:00Z"
    # A stand-in base marks everything built on it, so nothing can publish it by mistake.
    assert (STAND_IN_LABEL in labels) == build.on_stand_ins


def test_no_compilers_uv_git_or_env_files(contents: dict[str, list[str]]) -> None:
    assert contents["compilers"] == []
    assert contents["uv"] == []
    assert contents["git"] == []
    assert contents["env"] == []


def test_only_the_venv_and_the_code_under_app(contents: dict[str, list[str]]) -> None:
    assert contents["app"] == [".venv", "service"]
    assert contents["test_files"] == []
    assert contents["dev_tools"] == [], "dev/test/deploy dependency groups stay out"


def test_layers_above_the_base_stay_within_budget(engine: Engine, image: str) -> None:
    base = next(
        ref
        for ref in (RUNTIME_BASE, f"docker.io/library/{RUNTIME_BASE}")
        if engine("image", "inspect", ref, check=False).returncode == 0
    )
    added = engine.layer_bytes(image) - engine.layer_bytes(base)
    print(f"\nimage adds {added / 1e6:.1f} MB above {base} (budget {ADDED_BYTES_BUDGET / 1e6:.0f})")
    assert 0 < added <= ADDED_BYTES_BUDGET
