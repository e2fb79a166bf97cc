"""`xdpflow dump`: attach, meter for a while, print the merged flow table, detach.

The kernel half of the pipeline without export: useful to check an interface
and the tests' ground truth. With --scan-interval the pages are flipped and
drained while traffic runs (as the exporter does), and the drains are folded
together, so the totals show that flipping loses and duplicates nothing.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import TextIO

import numpy as np
import structlog

from exporter.config import Config
from exporter.drain import Pages
from exporter.flowtable import FlowTable
from exporter.ipfix.encoder import record_elements
from exporter.merge import clock_offset_ns
from exporter.readiness import Readiness
from exporter.records import Records
from xdp.loader import Datapath
from xdp.sizing import human_bytes

log = structlog.get_logger("xdpflow.dump")

_NEVER = 1e12  # timeouts that never fire: dump accumulates, it does not expire


class StopSignal:
    """Set by SIGINT/SIGTERM; wait() sleeps until the timeout or the signal.

    The handler only sets a flag and writes a byte to a pipe: a handler that takes a lock
    (threading.Event.set) deadlocks when the signal lands while the main thread holds that same
    lock inside Event.wait, and dump then never exits."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self.is_set = False

    def set(self, *_: object) -> None:
        self.is_set = True
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:   # the pipe is full of earlier signals: one is enough
            pass

    def wait(self, timeout: float | None) -> bool:
        if not self.is_set:
            select.select([self._r], [], [], timeout)
        return self.is_set

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


@dataclass(frozen=True)
class DumpOptions:
    """The kernel settings dump shares with `run` (interfaces, mode, max_entries, max_kernel_memory,
    scan_interval, ready_file: the one Config), and what only dump does."""

    config: Config
    seconds: float | None = None
    json: bool = False
    flip: bool = False   # flip and drain every config.scan_interval while counting


def run(opts: DumpOptions, out: TextIO = sys.stdout) -> int:
    cfg = opts.config
    stop = StopSignal()
    previous = {s: signal.signal(s, stop.set) for s in (signal.SIGINT, signal.SIGTERM)}
    table = FlowTable(active_timeout_s=_NEVER, idle_timeout_s=_NEVER)
    ended: list[Records] = []
    drains = 0
    readiness = Readiness(cfg.ready_file)
    try:
        with Datapath(max_entries=cfg.max_entries, memory_budget=cfg.max_kernel_memory).load() as dp:
            pages = Pages(dp)
            for ifname in cfg.interfaces:
                dp.attach(ifname, cfg.mode)
            log.info("metering", interfaces={a.ifname: a.mode for a in dp.attachments},
                     max_entries=cfg.max_entries, kernel_memory=human_bytes(dp.memory_bytes),
                     seconds=opts.seconds)
            readiness.ready(f"metering {', '.join(f'{a.ifname} ({a.mode})' for a in dp.attachments)}",
                            {"interfaces": {a.ifname: a.mode for a in dp.attachments},
                             "max_entries": cfg.max_entries})
            deadline = None if opts.seconds is None else time.monotonic() + opts.seconds
            while not stop.is_set:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                step = cfg.scan_interval if opts.flip else left
                if step is not None and left is not None:
                    step = min(step, left)
                if stop.wait(step) or not opts.flip:
                    continue
                drains += 1
                ended.append(table.update(pages.flip_and_merge(clock_offset_ns()).records, 0))
            readiness.stopping()
            dp.detach_all()
            for m in pages.merge_all(clock_offset_ns()):
                drains += 1
                ended.append(table.update(m.records, 0))
            stats = dp.read_stats()
    finally:
        readiness.close()
        for s, h in previous.items():
            signal.signal(s, h)
        stop.close()
    ended.append(table.expire_all())
    flows = np.concatenate(ended)
    flows["end_reason"] = 0
    flows = flows[np.argsort(-flows["octets"].astype(np.int64), kind="stable")]
    log.info("done", flows=len(flows), drains=drains)
    if opts.json:
        write_json(flows, stats, out)
    else:
        write_table(flows, stats, out)
    return 0


def write_json(flows: Records, stats: dict[str, int], out: TextIO) -> None:
    for rec in flows:
        out.write(json.dumps(record_elements(rec)) + "\n")
    out.write(json.dumps({"counters": stats}) + "\n")
    out.flush()


_PROTO = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}
_FLAGS = "FSRPAUECN"


def _flags(bits: int) -> str:
    return "".join(c if bits & (1 << i) else "." for i, c in enumerate(_FLAGS))


def write_table(flows: Records, stats: dict[str, int], out: TextIO, limit: int | None = None) -> None:
    head = f"{'proto':<6} {'source':<41} {'destination':<41} {'vlan':>4} {'if':>3} {'packets':>10} {'octets':>12} flags"
    out.write(head + "\n")
    for rec in flows if limit is None else flows[:limit]:
        d = record_elements(rec)
        fam = "IPv4" if int(rec["ip_version"]) == 4 else "IPv6"
        src = f"{d[f'source{fam}Address']}:{d['sourceTransportPort']}"
        dst = f"{d[f'destination{fam}Address']}:{d['destinationTransportPort']}"
        proto = _PROTO.get(int(rec["protocol"]), str(int(rec["protocol"])))
        out.write(f"{proto:<6} {src:<41} {dst:<41} {int(rec['vlan_id']):>4} {int(rec['ifindex']):>3} "
                  f"{int(rec['packets']):>10} {int(rec['octets']):>12} {_flags(int(rec['tcp_flags']))}\n")
    out.write(f"{len(flows)} flows; " + ", ".join(f"{k} {v}" for k, v in stats.items()) + "\n")
    out.flush()
