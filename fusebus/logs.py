"""structlog, configured once at the entry point.

JSON lines when stderr is not a terminal (containers, files, CI), coloured console lines
when it is. Context bound with :func:`structlog.contextvars.bind_contextvars` (task_id,
stream, type, agent) is merged into every line.
"""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = ("debug", "info", "warning", "error")


def configure_logging(*, level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog for this process.

    Args:
        level: the lowest level shown: debug, info, warning or error.
        fmt: ``json``, ``console`` or ``auto`` (console on a terminal, JSON otherwise).
    """
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if as_json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
