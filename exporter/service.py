"""The exporter loop: every scan interval drain -> merge -> expire -> encode -> send.

Blocking work (the page flip waits an RCU grace period; the batch drain and
the numpy stages are CPU work) runs in a worker thread via asyncio.to_thread;
the event loop (uvloop when available) only sends datagrams and handles
signals. SIGTERM / SIGINT stop the loop: the program is detached first, so
no packet can arrive afterwards, then both pages are drained, every flow is
expired with flowEndReason 4 (forced end), exported, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import structlog

from exporter.drain import Drained, Pages
from exporter.flowtable import FlowTable
from exporter.ipfix.encoder import Encoder
from exporter.merge import clock_offset_ns, merge
from exporter.records import END_FORCED, FLOW_RECORD, Records
from exporter.transport import Endpoint, UdpSender
from xdp.loader import Datapath, human_bytes

log = structlog.get_logger("xdpflow.service")


@dataclass(frozen=True)
class RunConfig:
    interfaces: tuple[str, ...]
    collectors: tuple[Endpoint, ...]
    mode: str = "auto"
    scan_interval: float = 10.0
    active_timeout: float = 60.0
    idle_timeout: float = 15.0
    max_entries: int = 500_000
    max_kernel_memory: int = 1 << 30
    observation_domain: int = 0
    mtu: int = 1400
    template_refresh: float = 60.0
    netns: str | None = None


@dataclass
class Export:
    encoder: Encoder
    sender: UdpSender


@dataclass
class ScanResult:
    entries: int
    flows: int
    expired: Records
    flip_seconds: float
    seconds: float
    observed_packets: int = 0   # the kernel's count for the drained pages' interval
    observed_octets: int = 0
    drained_packets: int = 0    # what the drained entries held
    drained_octets: int = 0

    @property
    def ignored_packets(self) -> int:
        """Metered but in no entry: LRU evictions and insert failures (exact: same interval)."""
        return self.observed_packets - self.drained_packets

    @property
    def ignored_octets(self) -> int:
        return self.observed_octets - self.drained_octets


@dataclass
class Exporter:
    cfg: RunConfig
    datapath: Datapath | None = None
    pages: Pages | None = None
    table: FlowTable | None = None
    exports: list[Export] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    scans: int = 0
    records_exported: int = 0
    observed_packets: int = 0
    ignored_packets: int = 0
    _last_stats: dict[str, int] = field(default_factory=dict)

    def _setup_kernel(self) -> None:
        dp = Datapath(max_entries=self.cfg.max_entries, memory_budget=self.cfg.max_kernel_memory).load()
        self.datapath = dp
        try:
            for ifname in self.cfg.interfaces:
                dp.attach(ifname, self.cfg.mode)
        except BaseException:
            dp.close()
            raise
        self.pages = Pages(dp)

    def _scan(self, drains: list[Drained], now: float, shutdown: bool) -> ScanResult:
        """Worker-thread half of a scan: merge, fold into the table, expire."""
        t0 = time.perf_counter()
        assert self.table is not None
        offset = clock_offset_ns()
        now_ms = int(now * 1000)
        expired: list[Records] = []
        res = ScanResult(0, 0, np.zeros(0, dtype=FLOW_RECORD), 0.0, 0.0)
        for d in drains:
            records = merge(d.keys, d.values, offset)
            res.entries += len(d.keys)
            res.flows += len(records)
            res.flip_seconds += d.flip_seconds
            res.observed_packets += d.stats["packets"]
            res.observed_octets += d.stats["octets"]
            res.drained_packets += int(records["packets"].sum())
            res.drained_octets += int(records["octets"].sum())
            expired.append(self.table.update(records, now_ms))
        if shutdown:
            expired.append(self.table.expire_all(END_FORCED))
        if expired:
            res.expired = np.concatenate(expired)
        res.seconds = time.perf_counter() - t0
        return res

    def _drain(self, shutdown: bool) -> list[Drained]:
        assert self.pages is not None and self.datapath is not None
        if shutdown:
            self.datapath.detach_all()
            return self.pages.drain_all()
        return [self.pages.flip_and_drain()]

    async def scan_once(self, shutdown: bool = False) -> ScanResult:
        t0 = time.perf_counter()
        drains = await asyncio.to_thread(self._drain, shutdown)
        now = time.time()
        res = await asyncio.to_thread(self._scan, drains, now, shutdown)
        sent = 0
        for ex in self.exports:
            datagrams = ex.encoder.encode(res.expired, now)
            ex.sender.send(datagrams)
            sent += len(datagrams)
        self.scans += 1
        self.records_exported += len(res.expired)
        assert self.datapath is not None
        stats = self.datapath.read_stats()
        delta = _delta(stats, self._last_stats)
        self._last_stats = stats
        self.observed_packets += res.observed_packets
        self.ignored_packets += res.ignored_packets
        log.debug("scan", entries=res.entries, flows=res.flows, exported=len(res.expired),
                  active=len(self.table) if self.table is not None else 0, datagrams=sent,
                  observed_packets=res.observed_packets, observed_octets=res.observed_octets,
                  ignored_packets=res.ignored_packets, ignored_octets=res.ignored_octets,
                  flip_ms=round(res.flip_seconds * 1000, 2), seconds=round(time.perf_counter() - t0, 4),
                  **{f"kernel_{k}": v for k, v in delta.items()})
        return res

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        try:
            self.exports = [Export(Encoder(odid=self.cfg.observation_domain, mtu=self.cfg.mtu,
                                           template_refresh_s=self.cfg.template_refresh),
                                   await UdpSender(ep).open()) for ep in self.cfg.collectors]
            self.table = FlowTable(active_timeout_s=self.cfg.active_timeout, idle_timeout_s=self.cfg.idle_timeout,
                                   capacity=max(2 * self.cfg.max_entries, 1))
            await asyncio.to_thread(self._setup_kernel)
            assert self.datapath is not None
            log.info("exporting", interfaces={a.ifname: a.mode for a in self.datapath.attachments},
                     max_entries=self.cfg.max_entries, kernel_memory=human_bytes(self.datapath.memory_bytes),
                     collectors=[str(e.sender.endpoint) for e in self.exports],
                     scan_interval=self.cfg.scan_interval, active_timeout=self.cfg.active_timeout,
                     idle_timeout=self.cfg.idle_timeout, observation_domain=self.cfg.observation_domain)
            # Templates go out at once, so collectors know them before the first data arrives.
            for ex in self.exports:
                ex.sender.send([ex.encoder.templates_message(time.time())])
            next_scan = time.monotonic() + self.cfg.scan_interval
            while not self.stop.is_set():
                try:
                    await asyncio.wait_for(self.stop.wait(), timeout=max(0.0, next_scan - time.monotonic()))
                except TimeoutError:
                    pass
                if self.stop.is_set():
                    break
                await self.scan_once()
                next_scan += self.cfg.scan_interval
                if next_scan < time.monotonic():  # a scan overran: skip ahead rather than bunch scans up
                    log.warning("scan overran the interval", interval=self.cfg.scan_interval)
                    next_scan = time.monotonic() + self.cfg.scan_interval
            res = await self.scan_once(shutdown=True)
            log.info("stopped", scans=self.scans, records_exported=self.records_exported,
                     final_records=len(res.expired), observed_packets=self.observed_packets,
                     ignored_packets=self.ignored_packets,
                     sent={str(e.sender.endpoint): vars(e.sender.stats) for e in self.exports})
            return 0
        finally:
            if self.datapath is not None:
                self.datapath.close()
            for ex in self.exports:
                await ex.sender.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def _delta(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in now.items()}


def run(cfg: RunConfig) -> int:
    try:
        import uvloop

        return uvloop.run(Exporter(cfg).run())
    except ImportError:
        return asyncio.run(Exporter(cfg).run())
