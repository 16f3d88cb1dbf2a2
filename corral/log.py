"""structlog set-up: JSON lines for daemons, readable console lines for the CLI."""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")


def parse_level(value: str) -> str:
    """A config file's log_level: one of LEVELS (any case), else ValueError (FILE:LINE there)."""
    level = value.strip().lower() if isinstance(value, str) else ""
    if level not in LEVELS:
        raise ValueError(f"unknown log level {value!r} (one of: {', '.join(LEVELS)})")
    return level


def configure(json_output: bool, level: str = "info", stream=None) -> None:
    stream = stream or sys.stderr
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, parse_level(level).upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str, **bound) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name).bind(**bound)
