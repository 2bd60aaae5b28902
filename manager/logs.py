"""Logging set-up for the multibot processes: JSON lines when not on a TTY, readable on one."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure_logging(
    level: str = "info", *, json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Route structlog (and stdlib logging) to ``stream`` (stderr by default).

    ``json=None`` picks JSON lines unless the stream is a terminal, which is what journald
    and log shippers want from a service, and what a person wants at a prompt.
    """
    out = stream or sys.stderr
    as_json = (not out.isatty()) if json is None else json
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}: use debug, info, warning or error")
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if as_json else _keep_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=numeric, stream=out, format="%(levelname)s %(name)s: %(message)s")


def configure_cli_logging() -> None:
    """For the command line tools: the libraries' warnings and errors, plain, on stderr
    (stdout is for the command's output); ``multibot start`` then configures its own."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        # Looked up per logger, not bound once: the stream may be swapped (tests, pagers).
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )


def _keep_exc_info(
    logger: object, method: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    """Leave exc_info for the console renderer, which formats tracebacks itself."""
    return event
