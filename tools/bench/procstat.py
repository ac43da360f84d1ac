"""CPU time of process trees and of the whole machine, read from ``/proc`` (Linux only).

Requests per second on a shared two-core machine say as much about the neighbours as about the
service; the CPU time a server's processes spent per request does not. A server is a process
tree (gunicorn master and its workers, the postmaster and its backends, nginx and its workers):
its CPU time is the sum over the tree of each process's own time plus the time of children it
has already reaped (``cutime``/``cstime``), so a worker or backend that exits during a
measurement is still counted, by its parent.
"""

from __future__ import annotations

import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    return raw[raw.rindex(")") + 2 :].split()


def _parent_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                parents[int(entry.name)] = int(fields[1])
    return parents


def tree(root: int) -> set[int]:
    """``root`` and every descendant alive now."""
    parents = _parent_map()
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid in found or pid not in parents:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    return found


def process_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of one process, in clock ticks (0 once it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0
    # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    return sum(int(fields[index]) for index in (11, 12, 13, 14))


@dataclass(frozen=True)
class TreeSample:
    ticks: dict[int, int]

    @classmethod
    def take(cls, roots: list[int]) -> TreeSample:
        pids: set[int] = set()
        for root in roots:
            pids |= tree(root)
        return cls({pid: process_ticks(pid) for pid in pids})

    def seconds_since(self, earlier: TreeSample) -> float:
        """CPU seconds spent between two samples; a process new since ``earlier`` counts whole."""
        ticks = 0
        for pid, now in self.ticks.items():
            ticks += max(now - earlier.ticks.get(pid, 0), 0)
        return ticks / TICKS_PER_SECOND


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent on anything but idle and iowait since boot."""
    with suppress(FileNotFoundError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu "):
                values = [int(value) for value in line.split()[1:]]
                idle = values[3] + (values[4] if len(values) > 4 else 0)
                # guest time is already counted in user/nice.
                return (sum(values[:8]) - idle) / TICKS_PER_SECOND
    return 0.0


def rss_mb(pid: int) -> float:
    with suppress(FileNotFoundError, ProcessLookupError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def machine_description() -> str:
    model = ""
    with suppress(FileNotFoundError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    usable = len(os.sched_getaffinity(0))
    return f"{usable} usable CPUs ({model or 'unknown model'}), load average {load}"
