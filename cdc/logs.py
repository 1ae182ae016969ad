"""structlog set-up. Only entry points (the CLI, the app factory) call :func:`configure`."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["console", "json"]


def default_format() -> LogFormat:
    """Human output on a terminal, JSON lines otherwise (cron, CI, containers)."""
    return "console" if sys.stderr.isatty() else "json"


def configure(fmt: LogFormat | None = None, *, level: int = logging.INFO) -> None:
    fmt = fmt or default_format()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
