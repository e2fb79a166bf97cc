"""structlog set-up: console lines on a terminal, JSON lines otherwise, to stderr."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

LEVELS = ("debug", "info", "warning", "error")


_stream: TextIO | None = None


def _log_stream() -> TextIO:
    """A private duplicate of stderr, made once.

    bcc's compile briefly points fd 2 elsewhere to keep clang's chatter out
    (xdp.loader); log lines written meanwhile from other threads must still
    reach the real stderr.
    """
    global _stream  # noqa: PLW0603 - one stream per process, shared by every configure()
    if _stream is None:
        try:
            _stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding="utf-8",
                                errors="replace")
        except (OSError, ValueError, AttributeError):  # no real fd (captured in tests): use it as it is
            _stream = sys.stderr
    return _stream


def configure(level: str = "info", fmt: str = "auto") -> None:
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        raise ValueError(f"log format must be auto, console or json, got {fmt!r}")
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_log_stream()),
        cache_logger_on_first_use=False,
    )
