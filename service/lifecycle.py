"""Process lifecycle flags shared by the server runtime and the readiness probe."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Lifecycle:
    """Set ``draining`` when the process has been asked to stop: readiness then answers 503 so
    the load balancer takes the instance out while in-flight requests finish."""

    draining: bool = False
    # Latched by /health/startup the first time the database answered at the expected schema.
    started: bool = False
