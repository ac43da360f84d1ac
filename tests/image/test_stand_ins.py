""".docker/stand-in-base, the recipe `make image` falls back on when a base image cannot be
pulled: exercised for the uv image on every run (seconds), with whichever engine is here, so a
fresh machine does not discover a broken recipe. (The Python base's recipe, debootstrap, takes
about 90 s; it runs whenever a machine builds without the real base, and the build test says
when the image was built on it.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .image_engine import STAND_IN_LABEL, Engine

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[2]
STAND_IN_SCRIPT = ROOT / ".docker" / "stand-in-base"


@pytest.fixture
def store_as(engine: Engine) -> Iterator[str]:
    name = f"localhost/fastapi-app-test/uv-stand-in:{uuid.uuid4().hex[:10]}"
    yield name
    engine("rmi", name, check=False)


def test_the_uv_stand_in_is_the_wheels_static_binaries(engine: Engine, store_as: str) -> None:
    dockerfile = (ROOT / ".docker" / "Dockerfile").read_text()
    match = re.search(r"--from=(ghcr\.io/astral-sh/uv:(\d+\.\d+\.\d+))", dockerfile)
    assert match
    reference, version = match.groups()
    result = subprocess.run(
        [str(STAND_IN_SCRIPT), engine.build_engine, reference, store_as],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "never to be published" in result.stderr
    labels = engine.inspect_image(store_as)["Config"]["Labels"]
    assert reference in labels[STAND_IN_LABEL]
    # FROM scratch like the official image: only static binaries run there.
    for binary in ("/uv", "/uvx"):
        ran = engine.run(store_as, ["--version"], entrypoint=binary, read_only=False)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert ran.stdout.split()[:2] == [binary.lstrip("/"), version]
