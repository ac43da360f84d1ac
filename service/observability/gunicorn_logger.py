"""gunicorn's ``logger_class``: gunicorn's own messages through the app's JSON pipeline."""

from __future__ import annotations

from typing import Any

from gunicorn import glogging

from service.observability.logging import configure_logging, route_logger_through
from service.settings import load_settings


class GunicornLogger(glogging.Logger):  # type: ignore[misc]
    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        handler = configure_logging(load_settings())
        # uvicorn's worker copies these handlers onto the uvicorn loggers.
        route_logger_through(handler, [self.error_log, self.access_log])
