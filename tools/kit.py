"""Helpers the tools and the tests share: finding a binary, free loopback ports, polling with a
deadline, loading a script by path. Nothing here imports pytest; test-only helpers (a missing
binary skips a test, or fails it in CI) live in tests/testkit.py."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
# Daemons (nginx, pgbouncer, redis-server) install into sbin, which a non-root PATH often lacks.
_SYSTEM_DIRS = ("/usr/local/sbin", "/usr/sbin", "/usr/local/bin", "/usr/bin")


def find_binary(name: str) -> str | None:
    """The path of the executable ``name``, or None: this interpreter's own bin directory first
    (the tools ``uv sync`` installs into .venv: hadolint, shellcheck, py-spy, uv), then PATH,
    then the system directories PATH may lack."""
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.is_file() and os.access(venv_bin, os.X_OK):
        return str(venv_bin)
    found = shutil.which(name)
    if found:
        return found
    for directory in _SYSTEM_DIRS:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


# `make pgbouncer` (pgbouncer/build.sh): a PgBouncer that tracks prepared statements, which
# Debian 12's package (1.18) cannot.
BUILT_PGBOUNCER = REPO / ".cache" / "pgbouncer" / "bin" / "pgbouncer"


def find_pgbouncer(*, prepared_statements: bool) -> str | None:
    """The PgBouncer to run: with ``prepared_statements`` one that tracks them (>= 1.21: the one
    ``make pgbouncer`` built, else an installed one that new enough), without it the installed
    one (``find_binary``), else the built one. None when there is no such PgBouncer."""
    installed = find_binary("pgbouncer")
    built = str(BUILT_PGBOUNCER) if os.access(BUILT_PGBOUNCER, os.X_OK) else None
    if not prepared_statements:
        return installed or built
    render = load_module(REPO / "pgbouncer" / "render.py", "fastapi_app_pgbouncer_render")
    for candidate in (built, installed):
        if candidate is not None and render.tracks_prepared_statements(candidate):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    condition: Callable[[], T | Literal[False] | None],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "",
) -> T:
    """Poll ``condition`` until it returns something truthy (that value), or fail after
    ``timeout``. ``None`` and ``False`` mean "not yet", so a condition may say so without
    inventing a truthy placeholder."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except Exception as exc:  # the thing is not up yet
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or condition}: {last_error}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def system_user(name: str, *, uid: int | None = None) -> pwd.struct_passwd:
    """The system user ``name``, created (no home, no login shell, its own group; with ``uid``
    when that is free) if it does not exist yet. Creating one needs root."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    command = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent"]
    command += ["--shell", "/usr/sbin/nologin", "--user-group"]
    if uid is not None:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            command += ["--uid", str(uid)]
    subprocess.run([*command, name], check=True, capture_output=True)
    return pwd.getpwnam(name)


def unprivileged_user(name: str) -> pwd.struct_passwd | None:
    """Who daemons started here run as: None when we are not root (as ourselves), else the
    system user ``name`` (PgBouncer refuses root; Nginx and Redis should not have it either)."""
    if os.geteuid() != 0:
        return None
    return system_user(name)


def drop_to(user: pwd.struct_passwd | None) -> dict[str, Any]:
    """``subprocess`` keyword arguments that drop to ``user`` (none for None)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def make_traversable(path: Path) -> None:
    """Let other users reach ``path``: r-x for group and others on it and on its parents (a
    temporary directory is 0700), as far as we own them."""
    rx = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    for directory in [path, *path.parents]:
        with contextlib.suppress(PermissionError):
            directory.chmod(directory.stat().st_mode | rx)


def load_module(path: Path, name: str) -> ModuleType:
    """A script or a conftest that is not importable as a package, loaded (anew) by path."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module
