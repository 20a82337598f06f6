"""structlog set-up shared by the daemon and its workers: JSON lines or console, on stderr."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure(level: str = "info", format: str = "json") -> None:
    renderer = (structlog.processors.JSONRenderer() if format == "json"
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        # Not cached: a reload may change level and format, and every logger
        # already handed out must follow (nothing logs on the hot path).
        cache_logger_on_first_use=False,
    )


def get(**context) -> structlog.typing.FilteringBoundLogger:
    """A logger carrying `context`; it follows later calls of configure()."""
    return structlog.get_logger(**context)
