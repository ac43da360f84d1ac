"""``python -m service serve``: the production server (gunicorn master + uvicorn workers).

The process becomes gunicorn at once (``exec``), so gunicorn is PID 1 in the container and
receives the kubelet's SIGTERM itself. Its config file (``gunicorn_conf.py``) then validates the
settings first, so a bad variable stops the container with one clear line before gunicorn binds
or forks anything, and puts the Prometheus multiprocess directory in the environment (workers
and the master must agree on it before anything imports prometheus_client) and empties it:
files left by a previous container run would be summed in as if their processes were alive.

Nothing is imported before the ``exec`` that gunicorn imports again (``python -m service
serve`` goes straight here, not through the CLI): loading the settings twice, once per
interpreter, was ~0.6 s of every start.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings

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
    argv = gunicorn_argv()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], argv)  # noqa: S606 - replaces this process with gunicorn, by design
