"""``xdpflow collect``: run the built-in collector from the command line.

Theory of operation. :func:`add_parser` registers the subcommand on the main CLI's subparsers and
sets ``func=run``; :func:`run` validates what argparse cannot (the ``--listen`` address, limits)
and reports a bad value as one ``xdpflow collect: error: ...`` line with exit code 2, then runs a
:class:`collectors.server.Collector` on uvloop (plain asyncio when uvloop is missing) until
SIGINT/SIGTERM, ``--exit-after-seconds`` or ``--exit-after-records``, and logs a summary of the
counters on stderr before returning 0. Records go to stdout (``--json``: JSON lines), log lines to
stderr (``--log-format``/``--log-level`` as the other subcommands take them), so
``xdpflow collect --json | jq`` works. :func:`main` lets ``python -m collectors.cli collect ...``
run without the ``xdpflow`` entry point.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import signal
import sys
from collections.abc import Callable
from typing import TextIO

from collectors.server import (
    DEFAULT_PORT,
    LOG_FORMATS,
    LOG_LEVELS,
    UDP_TEMPLATE_LIFETIME,
    Collector,
    parse_listen,
    stderr_logger,
)

PROG = "xdpflow collect"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``collect`` on the main parser's subparsers; its defaults carry ``func=run``."""
    p = sub.add_parser(
        "collect",
        help="run the built-in IPFIX collector (UDP)",
        description="Receive IPFIX over UDP and print one line per data record.",
    )
    p.add_argument(
        "--listen",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        metavar="HOST:PORT",
        help="address to bind, [ADDR]:PORT for IPv6 (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="JSON lines with IANA element names")
    p.add_argument(
        "--count-options",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count options data records in sequence numbers, as RFC 7011 says (nfcapd does not)",
    )
    p.add_argument(
        "--template-lifetime",
        type=float,
        default=UDP_TEMPLATE_LIFETIME,
        metavar="SECONDS",
        help="forget templates not refreshed for this long, 0 never; RFC 7011 suggests 3x the exporter's "
        "template refresh (default: %(default)s)",
    )
    p.add_argument(
        "--max-template-bytes",
        type=int,
        default=16 << 20,
        metavar="N",
        help="memory budget for templates, all exporters together; more are refused (default: %(default)s)",
    )
    p.add_argument("--exit-after-seconds", type=float, metavar="N", help="stop after N seconds")
    p.add_argument("--exit-after-records", type=int, metavar="N", help="stop after N data records")
    p.add_argument("--quiet", action="store_true", help="no record lines, only log lines and the summary")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default: %(default)s")
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="auto",
        help="log lines on stderr: console on a terminal, JSON lines otherwise (default: %(default)s)",
    )
    p.set_defaults(func=run)


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _reason(exc: BaseException) -> str:
    while isinstance(exc.__cause__, OSError):
        exc = exc.__cause__
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


def run(args: argparse.Namespace) -> int:
    """Run the collector described by parsed ``args``; returns the process exit code."""
    try:
        listen = parse_listen(args.listen)
    except ValueError as exc:
        return _error(str(exc))
    seconds = args.exit_after_seconds
    if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
        return _error(f"--exit-after-seconds must be a finite number >= 0, got {seconds}")
    if args.exit_after_records is not None and args.exit_after_records < 1:
        return _error(f"--exit-after-records must be >= 1, got {args.exit_after_records}")
    if not (math.isfinite(args.template_lifetime) and args.template_lifetime >= 0):
        return _error(f"--template-lifetime must be a finite number >= 0, got {args.template_lifetime}")
    if args.max_template_bytes < 1:
        return _error(f"--max-template-bytes must be >= 1, got {args.max_template_bytes}")
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_collect(args, listen))
    except KeyboardInterrupt:
        return 0


def _record_output() -> TextIO:
    """stdout through a buffered writer, flushed per datagram by the collector.

    With PYTHONUNBUFFERED (python -u) sys.stdout writes straight to the raw file, and a write that
    a signal interrupts half way returns short: the text layer drops the rest of the line silently.
    A BufferedWriter's flush() retries until everything is written.
    """
    if not isinstance(getattr(sys.stdout, "buffer", None), io.FileIO):
        return sys.stdout  # already buffered (or replaced, as under pytest's capture)
    return open(sys.stdout.fileno(), "w", encoding="utf-8", buffering=1 << 16, closefd=False)


async def _collect(args: argparse.Namespace, listen: tuple[str, int]) -> int:
    collector = Collector(
        listen,
        json_lines=args.json,
        output=None if args.quiet else _record_output(),
        count_options=args.count_options,
        keep=0,
        stop_after_records=args.exit_after_records,
        log=stderr_logger(args.log_format, args.log_level),
        max_template_bytes=args.max_template_bytes,
        template_lifetime=args.template_lifetime or None,
    )
    try:
        await collector.start()
    except OSError as exc:
        return _error(f"cannot listen on {args.listen}: {_reason(exc)}")
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, collector.done.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    try:
        await asyncio.wait_for(collector.done.wait(), args.exit_after_seconds)
    except TimeoutError:
        pass
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        counters = collector.counters()
        await collector.close()
    stderr_logger(args.log_format).info("summary", **counters)
    if collector.output_failed:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m collectors.cli collect [options]``."""
    parser = argparse.ArgumentParser(prog="xdpflow")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
