"""The `xdpflow` command: run (export), dump (kernel table), collect (built-in collector), check (preflight)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

# numpy's OpenBLAS would start a thread per CPU that spins after each use; nothing here needs BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from exporter import logs
from exporter.errors import CliError
from xdp.sizing import DEFAULT_MAX_ENTRIES, DEFAULT_MEMORY_BUDGET

EPILOG_DUMP = """examples:
  xdpflow dump --interface eth0 --seconds 10          readable table, largest flows first
  xdpflow dump --interface eth0 --json > flows.jsonl  one JSON object per flow, then counters
"""


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def add_kernel_options(p: argparse.ArgumentParser) -> None:
    """The kernel keys dump takes as flags, read by the config's own parsers (one meaning for a value)."""
    from exporter import config as configmod

    g = p.add_argument_group("kernel datapath")
    g.add_argument("--interface", "-i", action="append", required=True, metavar="IF",
                   help="interface to meter (repeat for several)")
    g.add_argument("--mode", choices=("auto", "native", "generic"), default="auto",
                   help="XDP mode: native (driver), generic (any interface, slower) or auto: native where the "
                        "driver supports it, else generic (default: %(default)s)")
    g.add_argument("--max-entries", type=configmod.flag_type("max_entries"), default=DEFAULT_MAX_ENTRIES,
                   metavar="N", help="flow table size per page in the kernel (default: %(default)s, as Skydive)")
    g.add_argument("--max-kernel-memory", type=configmod.flag_type("max_kernel_memory"),
                   default=DEFAULT_MEMORY_BUDGET, metavar="SIZE",
                   help="refuse to start if the flow maps would need more kernel memory than this "
                        f"(default: {configmod.default_text('max_kernel_memory')})")


def add_log_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", choices=logs.LEVELS, default="info", help="default: %(default)s")
    p.add_argument("--log-format", choices=("auto", "console", "json"), default="auto",
                   help="console on a terminal, JSON lines otherwise (default: %(default)s)")


def _cmd_dump(args: argparse.Namespace) -> int:
    from exporter import check, dump
    from exporter import config as configmod
    from exporter.config import Config
    from exporter.readiness import ready_file_problem

    problems = check.run_preflight()
    if problems:
        for p in problems:
            print(f"xdpflow: error: preflight: {p}", file=sys.stderr)
        return 1

    if args.ready_file is not None and (why := ready_file_problem(args.ready_file)) is not None:
        raise CliError(f"--ready-file {args.ready_file}: {why}")
    try:
        interfaces = configmod.read_flag("interfaces", args.interface)
    except ValueError as e:
        raise CliError(f"--interface: {e}") from None
    if not interfaces:
        raise CliError("--interface: name at least one interface to meter")
    kernel = Config(interfaces=interfaces, mode=args.mode,
                    max_entries=args.max_entries, max_kernel_memory=args.max_kernel_memory,
                    scan_interval=args.scan_interval or Config.scan_interval, ready_file=args.ready_file)
    opts = dump.DumpOptions(kernel, seconds=args.seconds, json=args.json, flip=args.scan_interval is not None)
    return dump.run(opts)


def build_parser() -> argparse.ArgumentParser:
    from exporter import config as configmod

    parser = argparse.ArgumentParser(
        prog="xdpflow",
        description="Flow metering in XDP, exported as IPFIX. The kernel counts packets per flow in per-CPU "
                    "maps; user space drains them every scan and exports flow records, so the cost follows "
                    "the number of flows, not the number of packets.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("dump", help="attach, count for a while, print the kernel's flow table, detach",
                       description="Attach the XDP program, count for --seconds (or until Ctrl-C), then print "
                                   "the merged flow table (per-CPU entries folded) and the kernel counters.",
                       epilog=EPILOG_DUMP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kernel_options(p)
    p.add_argument("--seconds", type=_positive_float, default=None, help="stop after N seconds (default: Ctrl-C)")
    p.add_argument("--json", action="store_true", help="JSON lines named after IPFIX elements, then counters")
    p.add_argument("--scan-interval", type=configmod.flag_type("scan_interval"), default=None, metavar="S",
                   help="flip and drain the kernel pages every S seconds while counting (as the exporter does)")
    p.add_argument("--ready-file", metavar="PATH", default=None,
                   help="write this file once the program is attached (remove it at the end), so a script "
                        "can start traffic only then; systemd readiness goes to $NOTIFY_SOCKET in any case")
    add_log_options(p)
    p.set_defaults(func=_cmd_dump)

    for register in _extra_commands():
        register(sub)
    return parser


Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


# Commands that live outside the product (the benchmarks, in tools/) register themselves through
# this entry point group (pyproject.toml), so the product never imports them by name.
COMMANDS_GROUP = "xdpflow.commands"


def _extra_commands() -> list[Register]:
    from importlib.metadata import entry_points

    from collectors import cli as collect_cli
    from exporter import check, runcli

    plugins = [ep.load() for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda ep: ep.name)]
    return [runcli.add_parser, collect_cli.add_parser, check.add_parser, *plugins]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        logs.configure(getattr(args, "log_level", "info"), getattr(args, "log_format", "auto"))
    except ValueError as e:
        parser.error(str(e))
    from xdp.headers import HeadersNotFound
    from xdp.loader import LoaderError

    try:
        return int(args.func(args))
    except (LoaderError, HeadersNotFound) as e:
        print(f"xdpflow: error: {e}", file=sys.stderr)
        return 1
    except CliError as e:
        print(f"xdpflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
