"""`xdpflow run`: the exporter's command line: config (file, environment, flags), preflight, then the service."""

from __future__ import annotations

import argparse
import sys

from exporter import config as configmod
from exporter.config import Config, ConfigError
from exporter.errors import CliError

EPILOG = """examples:
  xdpflow run --interface eth0                              export to 127.0.0.1:4739 (IPFIX over UDP)
  xdpflow run -i eth0 -i eth1 --collector 192.0.2.10:2055   two interfaces, one collector
  xdpflow run -i eth0 --collector 127.0.0.1:9995 --collector [2001:db8::1]:4739
  xdpflow run -i eth0 --scan-interval 5 --active-timeout 60 --idle-timeout 15
  xdpflow run --config /etc/xdpflow/xdpflow.toml           settings from a file (see config/xdpflow.toml)
  XDPFLOW_INTERFACES=eth0,eth1 XDPFLOW_SCAN_INTERVAL=5 xdpflow run
  xdpflow run -i eth0 --ready-file /run/xdpflow.ready &    the file appears once metering:
  while [ ! -e /run/xdpflow.ready ]; do sleep 0.1; done       start traffic only then

Every setting is a key in the TOML file, an XDPFLOW_<KEY> environment variable
and a flag; flags override the environment, which overrides the file.
Flows end on FIN/RST (flowEndReason 3), after --idle-timeout without packets (1),
after --active-timeout since they started (2), or at shutdown (4). SIGTERM/SIGINT
drain the kernel maps, export everything, detach and exit 0. Under systemd
(Type=notify) READY=1 goes to $NOTIFY_SOCKET once every interface is attached.
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="meter in XDP and export IPFIX to collectors",
                       description="Attach the XDP program and export IPFIX flow records: every scan interval "
                                   "the kernel's flow pages are flipped and drained, merged across CPUs, "
                                   "aged by the active/idle timeouts and sent to every collector.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    configmod.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from exporter import check, heap, logs, service
    from exporter.transport import EndpointError

    try:
        loaded = configmod.from_args(args)
    except ConfigError as e:
        for line in e.lines:
            print(f"xdpflow: error: {line}", file=sys.stderr)
        return 2
    cfg = loaded.config
    logs.configure(cfg.log_level, cfg.log_format)
    problems = check.run_preflight(cfg)
    if problems:
        for p in problems:
            print(f"xdpflow: error: preflight: {p}", file=sys.stderr)
        return 1

    def reload() -> Config:
        """SIGHUP: the file again, with the same environment and flags on top."""
        try:
            new = configmod.from_args(args).config
        except ConfigError as e:
            raise ValueError("; ".join(e.lines)) from None
        logs.configure(new.log_level, new.log_format)
        return new

    heap.release_large_arrays_to_the_os()
    try:
        return service.run(cfg, reload=reload if loaded.path else None)
    except EndpointError as e:
        raise CliError(str(e)) from None
