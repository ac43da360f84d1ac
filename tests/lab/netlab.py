"""Hosts as network namespaces, joined by veth pairs through a router namespace.

    client ─┐            ┌─ app1, app2
    nginx  ─┼─ router ───┼─ pgbouncer
            │            ├─ postgres
            │            └─ redis

Each host is a namespace of its own with one link (``eth0``, 10.200.<n>.2/24) to the router
(10.200.<n>.1), which forwards between them. Nothing is added to the machine's own namespace:
the veth pairs are created inside the router's namespace with their far end moved straight into
the host's, so every address used here exists only in namespaces this lab made, and deleting the
namespaces removes every link with them.

Faults are made where a real network makes them:

- ``cut(a, b)``: the router drops every packet between two hosts (iptables ``DROP`` in the
  router's FORWARD chain): no RST, no ICMP, packets simply vanish, like a partition.
- ``isolate(host)``: the same between a host and everyone.
- latency and resets: tests/lab/faultproxy.py, a TCP proxy in front of a service (``tc netem``
  is not available everywhere; a proxy is).

Code runs "on" a host in two ways: processes started with :meth:`NetLab.popen` (their network
namespace is the host's), and Python callables run in a thread that has entered the host's
namespace (:meth:`NetLab.call`, :func:`enter`): a socket belongs to the namespace it was created
in, whichever thread uses it later.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)


class LabUnavailableError(RuntimeError):
    """Namespaces cannot be made here (not root, no CAP_SYS_ADMIN, no ip/iptables)."""


def enter(namespace: str) -> None:
    """Move the calling thread (only it) into ``namespace``."""
    fd = os.open(os.path.join(NETNS_DIR, namespace), os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({namespace}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=20)
    if check and result.returncode != 0:
        raise LabUnavailableError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


@dataclass
class Host:
    name: str
    namespace: str
    index: int

    @property
    def address(self) -> str:
        return f"10.200.{self.index}.2"

    @property
    def gateway(self) -> str:
        return f"10.200.{self.index}.1"


@dataclass
class NetLab:
    """``with NetLab(["client", "nginx", ...]) as lab:``: namespaces up, torn down on exit."""

    host_names: list[str]
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    hosts: dict[str, Host] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _rules: set[tuple[str, str]] = field(default_factory=set)

    @property
    def router(self) -> str:
        return f"lab{self.tag}-router"

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    # --- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> NetLab:
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def create(self) -> None:
        _ip("netns", "add", self.router)
        self.router_sh("ip", "link", "set", "lo", "up")
        self.router_sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
        for index, name in enumerate(self.host_names, start=1):
            host = Host(name, f"lab{self.tag}-{name}", index)
            _ip("netns", "add", host.namespace)
            self.hosts[name] = host
            link = f"to-{name}"[:15]
            _ip("-n", self.router, "link", "add", link, "type", "veth", "peer", "name", "eth0",
                "netns", host.namespace)  # fmt: skip
            _ip("-n", self.router, "addr", "add", f"{host.gateway}/24", "dev", link)
            _ip("-n", self.router, "link", "set", link, "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "eth0", "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            _ip("-n", host.namespace, "route", "add", "default", "via", host.gateway)

    def destroy(self) -> None:
        """Stop every process started on a host, then delete the namespaces (and their links)."""
        for process in self.processes:
            _stop(process)
        for namespace in [h.namespace for h in self.hosts.values()] + [self.router]:
            # Anything still running in a namespace of ours was started by this lab.
            pids = _ip("netns", "pids", namespace, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", namespace, check=False)
        self.hosts.clear()

    # --- running things on hosts ----------------------------------------------------------------
    def router_sh(self, *argv: str) -> None:
        result = subprocess.run(
            ["ip", "netns", "exec", self.router, *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=20,
        )
        if result.returncode != 0:
            raise LabUnavailableError(f"{' '.join(argv)}: {result.stderr.strip()}")

    def call(self, host: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` in a thread inside ``host``'s namespace."""
        result: list[T] = []
        errors: list[BaseException] = []

        def target() -> None:
            try:
                enter(self.hosts[host].namespace)
                result.append(function(*args, **kwargs))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=target, name=f"on-{host}", daemon=True)
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
        return result[0]

    def popen(self, host: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """A process on ``host`` (forked from a thread inside its namespace), tracked for
        :meth:`destroy`. ``user=``/``group=`` drop privileges as ``subprocess.Popen`` does."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)
        process = cast("subprocess.Popen[bytes]", self.call(host, subprocess.Popen, argv, **kwargs))
        self.processes.append(process)
        return process

    # --- faults ---------------------------------------------------------------------------------
    def cut(self, a: str, b: str) -> None:
        """Drop every packet between hosts ``a`` and ``b`` (both directions), silently."""
        pair = (a, b)
        if pair in self._rules:
            return
        for src, dst in ((a, b), (b, a)):
            self.router_sh("iptables", "-I", "FORWARD", "-s", self[src].address, "-d",
                           self[dst].address, "-j", "DROP")  # fmt: skip
        self._rules.add(pair)

    def heal(self, a: str, b: str) -> None:
        if (a, b) not in self._rules:
            return
        for src, dst in ((a, b), (b, a)):
            self.router_sh("iptables", "-D", "FORWARD", "-s", self[src].address, "-d",
                           self[dst].address, "-j", "DROP")  # fmt: skip
        self._rules.discard((a, b))

    def isolate(self, host: str) -> None:
        for other in self.hosts:
            if other != host:
                self.cut(host, other)

    def heal_all(self) -> None:
        for a, b in list(self._rules):
            self.heal(a, b)


def _stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


@contextlib.contextmanager
def probe_namespaces() -> Iterator[None]:
    """Make and delete one namespace: raises LabUnavailableError when this machine cannot."""
    name = f"labprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", name)
    except (LabUnavailableError, FileNotFoundError) as exc:
        raise LabUnavailableError(str(exc)) from None
    try:
        yield
    finally:
        _ip("netns", "del", name, check=False)
