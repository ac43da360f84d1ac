"""Event-loop lag: how late the worker's loop runs a callback that was due.

A coroutine sleeps ``interval`` seconds and measures how much later than that it woke up. Lag
is time every request waiting on this loop also waits: CPU-bound code in an async route, a
synchronous call, a collector pause. Sampled twice a second it costs nothing measurable and
answers "is this worker's loop starved?" directly, per worker (``make soak`` plots its slope).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

DEFAULT_INTERVAL_SECONDS = 0.5


async def measure_loop_lag(
    report: Callable[[float], None], interval: float = DEFAULT_INTERVAL_SECONDS
) -> None:
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        report(max(loop.time() - due, 0.0))


@contextlib.asynccontextmanager
async def loop_lag_monitor(
    report: Callable[[float], None], interval: float = DEFAULT_INTERVAL_SECONDS
) -> AsyncIterator[None]:
    """Run :func:`measure_loop_lag` for the duration of the block (the app's lifespan)."""
    task = asyncio.create_task(measure_loop_lag(report, interval), name="loop-lag")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
