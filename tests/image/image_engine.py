"""Build the image with `make image`'s script and run containers of it, with docker or podman.

Docker when a daemon answers (GitHub's runners), else podman on the store buildah built into.
Containers share the host's network namespace (``--network host``): they reach the test
PostgreSQL on 127.0.0.1 and listen on free loopback ports the tests choose, so no bridge, NAT
or address other than 127.0.0.1 is involved. (One test gives a container a namespace of its own
with ``--network none``: loopback only, probed from inside.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testkit import find_binary, require_binary

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / ".docker" / "build-image"
STAND_IN_LABEL = "io.github.fastapi-app.stand-in"


def docker_answers() -> bool:
    docker = find_binary("docker")
    if docker is None:
        return False
    try:
        probe = subprocess.run([docker, "info"], capture_output=True, timeout=15, check=False)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


@dataclass
class Build:
    reference: str
    engine: str
    output: str
    seconds: float

    @property
    def on_stand_ins(self) -> bool:
        return "STAND-IN" in self.output


@dataclass
class Engine:
    """The command-line client that runs containers: ``docker`` or ``podman``."""

    name: str
    command: list[str]
    run_flags: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)

    @classmethod
    def detect(cls) -> Engine:
        if docker_answers():
            return cls("docker", [require_binary("docker")])
        require_binary("buildah")
        podman = require_binary("podman")
        command = [podman]
        # crun (podman's default runtime) cannot start containers inside some sandboxes (this
        # kit's CI machines among them); runc can, and is what Kubernetes nodes mostly run.
        runc = find_binary("runc")
        if runc:
            command += ["--runtime", runc]
        # podman asks for a higher open-files/processes limit than an unprivileged sandbox may
        # grant; these are ample for the few processes a test container runs.
        flags = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
        return cls("podman", command, flags)

    @property
    def build_engine(self) -> str:
        return "docker" if self.name == "docker" else "buildah"

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True, input_: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.command, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input_,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{self.name} {' '.join(args[:3])} … exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def build(self, tag: str) -> Build:
        started = time.monotonic()
        result = subprocess.run(
            [str(BUILD_SCRIPT), "--tag", tag, "--engine", self.build_engine],
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
            cwd=ROOT,
            # pip of this interpreter downloads the uv wheel if a stand-in base is needed.
            env={**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)},
        )
        output = result.stderr + result.stdout
        assert result.returncode == 0, f"make image failed:\n{output[-6000:]}"
        reference = result.stdout.strip().splitlines()[-1]
        return Build(reference, self.build_engine, output, time.monotonic() - started)

    def _run_flags(
        self,
        *,
        user: str | None,
        env: dict[str, str],
        read_only: bool,
        healthcheck: bool,
        network: str = "host",
    ) -> list[str]:
        # Never pull: the image under test and its bases are local.
        flags = ["--pull", "never", "--network", network, *self.run_flags]
        if user is not None:
            flags += ["--user", user]
        if read_only:
            # Only /tmp is writable, as in the chart (readOnlyRootFilesystem + an emptyDir on
            # /tmp). podman would otherwise add tmpfs mounts of its own on /var/tmp and /run.
            flags += ["--read-only", "--tmpfs", "/tmp:rw,mode=1777"]
            if self.name == "podman":
                flags += ["--read-only-tmpfs=false"]
        if not healthcheck:
            flags += ["--no-healthcheck"]
        elif self.name == "podman":
            # The check stays in the config (`podman healthcheck run` executes it); only the
            # systemd timer that would run it periodically is left out (no systemd here).
            flags += ["--health-interval", "disable"]
        for name, value in env.items():
            flags += ["--env", f"{name}={value}"]
        return flags

    def run(
        self,
        image: str,
        args: Sequence[str] = (),
        *,
        user: str | None = None,
        env: dict[str, str] | None = None,
        read_only: bool = True,
        entrypoint: str | None = None,
        mounts: dict[Path, str] | None = None,
        writable_mounts: dict[Path, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run a container to completion and remove it (``mounts``: read-only bind mounts;
        ``writable_mounts``: read-write ones, like the backup jobs' volume)."""
        flags = self._run_flags(user=user, env=env or {}, read_only=read_only, healthcheck=False)
        for source, target in (mounts or {}).items():
            flags += ["--volume", f"{source}:{target}:ro"]
        for source, target in (writable_mounts or {}).items():
            flags += ["--volume", f"{source}:{target}:rw"]
        if entrypoint is not None:
            flags += ["--entrypoint", entrypoint]
        return self("run", "--rm", *flags, image, *args, timeout=timeout, check=False)

    def start(
        self,
        image: str,
        args: Sequence[str] = (),
        *,
        user: str | None = None,
        env: dict[str, str] | None = None,
        read_only: bool = True,
        network: str = "host",
    ) -> str:
        """Start a detached container; the caller stops it (``remove``) in a finaliser.
        ``network="none"``: its own network namespace with only a loopback interface."""
        name = f"fastapi-app-test-{uuid.uuid4().hex[:12]}"
        flags = self._run_flags(
            user=user, env=env or {}, read_only=read_only, healthcheck=True, network=network
        )
        self("run", "--detach", "--name", name, *flags, image, *args)
        self.started.append(name)
        return name

    def remove(self, name: str) -> None:
        self("rm", "--force", name, check=False, timeout=60)
        if name in self.started:
            self.started.remove(name)

    def logs(self, name: str) -> str:
        result = self("logs", name, check=False)
        return result.stdout + result.stderr

    def state(self, name: str) -> dict[str, Any]:
        result = self("inspect", "--type", "container", name, check=False)
        if result.returncode != 0:
            return {}
        state: dict[str, Any] = json.loads(result.stdout)[0]["State"]
        return state

    def inspect_image(self, image: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self("image", "inspect", image).stdout)[0]
        return data

    def healthcheck(self, image: str) -> dict[str, Any] | None:
        """The image's HEALTHCHECK (docker keeps it in Config, podman next to it)."""
        data = self.inspect_image(image)
        found = data["Config"].get("Healthcheck") or data.get("Healthcheck")
        return dict(found) if found else None

    def layer_bytes(self, image: str) -> int:
        """The uncompressed size of the image's layers, summed from its history (the same
        measure in docker's classic and containerd stores and in podman's, unlike `Size`)."""
        if self.name == "podman":
            history = json.loads(self("history", "--format", "json", image).stdout)
            return sum(int(entry["size"]) for entry in history)
        lines = self("history", "--human=false", "--format", "{{.Size}}", image).stdout
        return sum(int(line) for line in lines.split())

    def exec(
        self, name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        flags: list[str] = []
        for key, value in (env or {}).items():
            flags += ["--env", f"{key}={value}"]
        return self("exec", *flags, name, *args, timeout=timeout, check=False)

    def untag(self, reference: str) -> None:
        """Drop the test's tag but keep the layers: the next session's build reuses them.
        (`podman rmi` would also delete the untagged parent layers, i.e. the build cache;
        BuildKit keeps its cache apart from the image, so docker can simply remove the tag.)"""
        command = ("untag", reference, reference) if self.name == "podman" else ("rmi", reference)
        self(*command, check=False, timeout=120)
