"""structlog set-up: JSON lines for daemons, readable console lines for the CLI.

A daemon logs to stderr (the journal under systemd) unless its configuration names a file
(`log_file`, `LogFile`). Then each rendered line is handed to a queue on the event loop's
thread (never blocking) and written by a thread of its own (logging's QueueListener), through
a RotatingFileHandler that keeps `backups` older files of at most `max_bytes`, or, with
`max_bytes` 0, a WatchedFileHandler that reopens the file after an external logrotate moved it.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import queue
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from corral.errors import ConfigError

LEVELS = ("debug", "info", "warning", "error", "critical")

DEFAULT_MAX_BYTES = 50 << 20  # 50 MiB a file before it is rotated
DEFAULT_BACKUPS = 5
MIN_MAX_BYTES = 1 << 10  # below this, nearly every line would start a new file
MAX_BACKUPS = 100


def parse_level(value: str) -> str:
    """A config file's log_level: one of LEVELS (any case), else ValueError (FILE:LINE there)."""
    level = value.strip().lower() if isinstance(value, str) else ""
    if level not in LEVELS:
        raise ValueError(f"unknown log level {value!r} (one of: {', '.join(LEVELS)})")
    return level


@dataclass(frozen=True)
class LogFile:
    """Where a daemon writes its JSON lines instead of stderr. `max_bytes` 0: never rotated by
    the daemon (an external logrotate moves the file; it is reopened then)."""

    path: Path
    max_bytes: int = DEFAULT_MAX_BYTES
    backups: int = DEFAULT_BACKUPS


def parse_log_path(value: str) -> Path | None:
    """`log_file`: an absolute path in a directory this process can write to; empty: stderr."""
    if not value.strip():
        return None
    path = Path(value)
    if not path.is_absolute():
        raise ValueError(f"{value!r} is not an absolute path")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; name a file in it")
    if not path.parent.is_dir():
        raise ValueError(f"directory {path.parent} does not exist")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{path} is not writable by this process")
    if not path.exists() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"directory {path.parent} is not writable by this process")
    return path


def parse_max_bytes(value: Any) -> int:
    """`log_max_bytes`: a size (50M, 1G, 1048576) of at least 1K, or 0 (rotated by logrotate)."""
    from corral.units import parse_size

    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 50M, got {value!r}")
    if value == 0 or (isinstance(value, str) and value.strip() == "0"):
        return 0
    if (isinstance(value, int) and value < 0) or str(value).strip().startswith("-"):
        raise ValueError(f"must not be negative, got {value}")
    size = parse_size(str(value), "size")  # InvalidArgument: the config reader gives it FILE:LINE
    if size < MIN_MAX_BYTES:
        raise ValueError(f"{value!r} is less than 1K (or 0: rotated by an external logrotate)")
    return size


def parse_backups(value: int) -> int:
    """`log_backups`: rotated files kept beside the current one."""
    if not 1 <= value <= MAX_BACKUPS:
        raise ValueError(f"must be between 1 and {MAX_BACKUPS}, got {value}")
    return value


def log_file_from(section) -> LogFile | None:
    """The `log_file`, `log_max_bytes`, `log_backups` keys of a daemon's config (corral.config.Section)."""
    path = section.get("log_file", str, None, parse=parse_log_path)
    max_bytes = section.get("log_max_bytes", object, DEFAULT_MAX_BYTES, parse=parse_max_bytes)
    backups = section.get("log_backups", int, DEFAULT_BACKUPS, parse=parse_backups)
    if path is None:
        for key in ("log_max_bytes", "log_backups"):
            if key in section.values:
                raise section.error(key, "has no effect without log_file (logs go to stderr)")
        return None
    return LogFile(path, max_bytes, backups)


def describe(file: LogFile | None) -> str:
    """`, log FILE (...)` for a --check-config summary; nothing for stderr."""
    if file is None:
        return ""
    from corral.units import format_size

    rotation = f"rotated at {format_size(file.max_bytes)}, {file.backups} kept" if file.max_bytes else "logrotate"
    return f", log {file.path} ({rotation})"


LOG_FILE_KEYS = frozenset({"log_file", "log_max_bytes", "log_backups"})

_listener: logging.handlers.QueueListener | None = None


def configure(json_output: bool, level: str = "info", stream=None, file: LogFile | None = None) -> None:
    """Set up structlog for this process: lines to `stream` (stderr), or to `file` through a
    writer thread. Raises ConfigError when the file cannot be opened."""
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False)
    if file is None:
        _stop_listener()  # configured again: the earlier file's writer finishes first
        factory = structlog.PrintLoggerFactory(file=stream or sys.stderr)
    else:
        factory, listener = _file_logger_factory(file)  # opened first: a bad file changes nothing
        _stop_listener()
        _start_listener(listener)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, parse_level(level).upper())),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def _file_logger_factory(file: LogFile):
    try:
        if file.max_bytes:
            handler: logging.Handler = logging.handlers.RotatingFileHandler(
                file.path, maxBytes=file.max_bytes, backupCount=file.backups, encoding="utf-8")
        else:
            handler = logging.handlers.WatchedFileHandler(file.path, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot open the log file {file.path}: {exc.strerror or exc}") from None
    handler.setFormatter(logging.Formatter("%(message)s"))  # the line is rendered JSON already
    lines: queue.SimpleQueue = queue.SimpleQueue()  # unbounded: a put never waits on the disk
    listener = logging.handlers.QueueListener(lines, handler)
    # A logger of its own, not the root: nothing else (grpc, asyncio) writes through it, and
    # structlog has filtered by level already.
    logger = logging.getLogger("corral.logfile")
    logger.handlers[:] = [logging.handlers.QueueHandler(lines)]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return (lambda *args: logger), listener


def _start_listener(listener: logging.handlers.QueueListener) -> None:
    global _listener
    listener.start()
    _listener = listener


def _stop_listener() -> None:
    """Write what is queued and close the file (at exit, or before configuring again)."""
    global _listener
    if _listener is not None:
        listener, _listener = _listener, None
        listener.stop()
        for handler in listener.handlers:
            handler.close()


atexit.register(_stop_listener)


def get_logger(name: str, **bound) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name).bind(**bound)
