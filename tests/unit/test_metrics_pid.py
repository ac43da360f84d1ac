"""The process id prometheus-client's multiprocess values use is asked once per process, and is
still right after a fork (values written by a worker must go to that worker's file)."""

from __future__ import annotations

import os

from service.observability.metrics import _ForkAwarePid


def test_the_cached_pid_is_this_process_and_is_refreshed_in_a_forked_child() -> None:
    pid = _ForkAwarePid()
    assert pid() == os.getpid()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child, which reports through the pipe
        try:
            os.write(write_end, f"{pid()} {os.getpid()}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    reported, actual = os.read(read_end, 100).decode().split()
    os.close(read_end)
    os.waitpid(child, 0)
    assert int(reported) == int(actual) == child
    assert pid() == os.getpid() != child
