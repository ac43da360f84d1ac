"""What the image tests share: who the containers run as, and a `serve` container handle."""

from __future__ import annotations

from dataclasses import dataclass

from testkit import free_port

from .image_engine import Engine

GATEWAY_SECRET = "image-test-gateway-secret-0123456789abcdef"
IMAGE_UID = "10001"
# What OpenShift's restricted SCC does: a UID from the namespace's range, primary group 0.
ARBITRARY_USER = "1000770000:0"


@dataclass(frozen=True)
class Migration:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Served:
    """A `serve` container (the image's default command) on free loopback ports."""

    engine: Engine
    name: str
    user: str
    port: int
    metrics_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def logs(self) -> str:
        return self.engine.logs(self.name)


def serve_env(database_url: str, port: int, metrics_port: int, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "GATEWAY_SHARED_SECRET": GATEWAY_SECRET,
        # Loopback only: the container shares the host's network namespace.
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "METRICS_PORT": str(metrics_port),
        "WEB_CONCURRENCY": "2",
        "RATE_LIMIT_ENABLED": "false",
        **extra,
    }


def start_served(
    engine: Engine, image: str, database_url: str, user: str | None, **extra: str
) -> Served:
    port, metrics_port = free_port(), free_port()
    name = engine.start(image, user=user, env=serve_env(database_url, port, metrics_port, **extra))
    return Served(engine, name, user or IMAGE_UID, port, metrics_port)
