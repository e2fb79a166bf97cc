"""`xdpflow run`: the exporter's command line."""

from __future__ import annotations

import argparse

from exporter.cli import CliError, _positive_float, add_kernel_options, add_log_options

EPILOG = """examples:
  xdpflow run --interface eth0                              export to 127.0.0.1:4739 (IPFIX over UDP)
  xdpflow run -i eth0 -i eth1 --collector 192.0.2.10:2055   two interfaces, one collector
  xdpflow run -i eth0 --collector 127.0.0.1:9995 --collector [2001:db8::1]:4739
  xdpflow run -i eth0 --scan-interval 5 --active-timeout 60 --idle-timeout 15

Flows end on FIN/RST (flowEndReason 3), after --idle-timeout without packets (1),
after --active-timeout since they started (2), or at shutdown (4). SIGTERM/SIGINT
drain the kernel maps, export everything, detach and exit 0.
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="meter in XDP and export IPFIX to collectors",
                       description="Attach the XDP program and export IPFIX flow records: every scan interval "
                                   "the kernel's flow pages are flipped and drained, merged across CPUs, "
                                   "aged by the active/idle timeouts and sent to every collector.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kernel_options(p)
    g = p.add_argument_group("export")
    g.add_argument("--collector", "-c", action="append", metavar="HOST:PORT",
                   help="IPFIX collector, UDP (repeat for several; default 127.0.0.1:4739)")
    g.add_argument("--scan-interval", type=_positive_float, default=10.0, metavar="S",
                   help="seconds between drains of the kernel table (default: %(default)s)")
    g.add_argument("--active-timeout", type=_positive_float, default=60.0, metavar="S",
                   help="export long flows at least this often (default: %(default)s)")
    g.add_argument("--idle-timeout", type=_positive_float, default=15.0, metavar="S",
                   help="end a flow after this long without packets (default: %(default)s)")
    g.add_argument("--observation-domain", type=int, default=0, metavar="N",
                   help="IPFIX observation domain id, 0..4294967295 (default: %(default)s)")
    g.add_argument("--mtu", type=int, default=1400, metavar="N",
                   help="largest IPFIX message in bytes, 512..65535 (default: %(default)s)")
    g.add_argument("--template-refresh", type=_positive_float, default=60.0, metavar="S",
                   help="re-send templates at least this often over UDP (default: %(default)s)")
    add_log_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from exporter import service
    from exporter.transport import EndpointError, parse_endpoint

    try:
        collectors = tuple(parse_endpoint(c) for c in (args.collector or ["127.0.0.1:4739"]))
    except EndpointError as e:
        raise CliError(str(e)) from None
    if not 0 <= args.observation_domain <= 0xFFFFFFFF:
        raise CliError(f"--observation-domain {args.observation_domain}: must be 0..4294967295")
    if not 512 <= args.mtu <= 65535:
        raise CliError(f"--mtu {args.mtu}: must be 512..65535")
    if args.idle_timeout > args.active_timeout:
        raise CliError(f"--idle-timeout {args.idle_timeout} is longer than --active-timeout {args.active_timeout}")
    cfg = service.RunConfig(
        interfaces=tuple(args.interface), collectors=collectors, mode=args.mode, scan_interval=args.scan_interval,
        active_timeout=args.active_timeout, idle_timeout=args.idle_timeout, max_entries=args.max_entries,
        max_kernel_memory=args.max_kernel_memory, observation_domain=args.observation_domain, mtu=args.mtu,
        template_refresh=args.template_refresh, netns=args.netns)
    try:
        return service.run(cfg)
    except EndpointError as e:
        raise CliError(str(e)) from None
