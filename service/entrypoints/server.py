"""``python -m service serve``: the production server (gunicorn master + uvicorn workers).

Settings are validated here first, so a bad variable stops the container with one clear line
before gunicorn starts. The Prometheus multiprocess directory is put in the environment (workers
and the master must agree on it before anything imports prometheus_client) and emptied: files
left by a previous container run would be summed in as if their processes were alive. Then the
process becomes gunicorn (``exec``), so gunicorn is PID 1 in the container and receives the
kubelet's SIGTERM itself.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from service.settings import Settings, load_settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
APP = "service.app:create_app_from_env()"
GUNICORN_CONF = Path(__file__).with_name("gunicorn_conf.py")


def multiproc_dir(settings: Settings) -> Path:
    """The metrics directory: the setting, else one per port under the temp dir."""
    if settings.prometheus_multiproc_dir is not None:
        return settings.prometheus_multiproc_dir
    return Path(tempfile.gettempdir()) / f"prometheus-multiproc-{settings.port}"


def ensure_multiproc_env(settings: Settings) -> Path:
    path = multiproc_dir(settings)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def prepare_multiproc_dir(path: Path) -> None:
    """Create the directory, or empty it of a previous run's files."""
    path.mkdir(parents=True, exist_ok=True)
    # Only prometheus-client's files: the variable could point somewhere shared by mistake.
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)


def gunicorn_argv(app: str = APP) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), app]


def serve() -> int:
    settings = load_settings()
    prepare_multiproc_dir(ensure_multiproc_env(settings))
    argv = gunicorn_argv()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], argv)  # noqa: S606 - replaces this process with gunicorn, by design
