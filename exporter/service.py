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
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import structlog

from exporter import attachments, core, heap
from exporter.accounting import SELECTION_COUNTERS, CapacityWarning, ScanResult, Totals
from exporter.biflow import BiflowTable
from exporter.config import Config
from exporter.core import CoreTable
from exporter.drain import Drained, Pages
from exporter.flowtable import FlowTable, retime
from exporter.interfaces import LinkWatcher
from exporter.ipfix import Encoder, ExporterState
from exporter.ipfix.encoder import FlowTotals
from exporter.ipfix.options import Interface
from exporter.kstats import DropWarning, KernelStats
from exporter.merge import clock_offset_ns, merge
from exporter.metrics import Metrics
from exporter.readiness import Readiness, process_age_seconds
from exporter.records import END_FORCED, FLOW_RECORD, Records
from exporter.transport import Endpoint, EndpointError, Sender, StreamOptions, TlsOptions, make_sender
from exporter.tunnels import FEATURE as TUNNELS
from exporter.tunnels import NO_TUNNELS, TunnelStore
from xdp import filters
from xdp.loader import Datapath, LoaderError
from xdp.sizing import human_bytes

log = structlog.get_logger("xdpflow.service")

# Sized or bound at start: the kernel maps, their budget, the metrics socket, the XDP mode.
# biflow: the flow table holds another kind of record.
# egress: it decides how biflows pair (exporter/biflow.py).
# ready_file: written once, at the start; a new path would leave the old file behind.
# tunnels: compiled into the program.
RESTART_ONLY = ("max_entries", "max_kernel_memory", "metrics", "mode", "biflow", "egress", "ready_file", "tunnels")


@dataclass
class Export:
    """One collector: its own encoder state (templates, sequence numbers) and transport.

    The transport calls back into it: `on_connect` for the templates a new stream connection
    starts with, `lost` with the tags of messages it could not deliver: their flow totals, which
    the encoder gave each message and the scan handed the sender along with it."""

    encoder: Encoder
    sender: Sender[FlowTotals] = field(init=False)   # made for this export, with its callbacks (_open_export)
    not_sent: FlowTotals = field(default_factory=FlowTotals)
    not_sent_first_ms: int = 0   # when the first and the latest flow record were lost (0: none yet)
    not_sent_last_ms: int = 0

    def lost(self, totals: Sequence[FlowTotals]) -> None:
        before = self.not_sent.flows
        self.not_sent = sum(totals, self.not_sent)
        if self.not_sent.flows > before:
            self.not_sent_last_ms = time.time_ns() // 1_000_000
            self.not_sent_first_ms = self.not_sent_first_ms or self.not_sent_last_ms

    def on_connect(self, follower: bytes | None) -> bytes:
        """Templates for a new stream connection (which may come from another source address), with
        the header of the queued message that will follow them."""
        self.follow_source_address()
        return self.encoder.templates_message(time.time(), follower)

    def follow_source_address(self) -> None:
        """exporterIPv4/IPv6Address: the session's source address, as the socket has it now."""
        address = self.sender.local_address
        if address is not None:
            self.encoder.set_exporter_address(address)


@dataclass
class Exporter:
    cfg: Config
    datapath: Datapath | None = None
    pages: Pages | None = None
    table: FlowTable | CoreTable | None = None
    exports: list[Export] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    scans: int = 0
    records_exported: int = 0
    totals: Totals = field(default_factory=Totals)   # what the options records report, since start
    interfaces: tuple[Interface, ...] = ()   # what template 264 names: the metered ifindexes
    started_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    _sessions: int = 0
    capacity: CapacityWarning = field(default_factory=CapacityWarning)
    metrics: Metrics | None = None
    reload: Callable[[], Config] | None = None
    _fill: float = 0.0
    _attach_lock: threading.Lock = field(default_factory=threading.Lock)
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _links_changed: asyncio.Event = field(default_factory=asyncio.Event)
    _last_stats: dict[str, int] = field(default_factory=dict)
    kstats: KernelStats = field(default_factory=KernelStats)  # the kernel's own drop counters, beside ours
    _drop_warning: DropWarning = field(default_factory=DropWarning)
    readiness: Readiness | None = None
    startup: dict[str, float] = field(default_factory=dict)   # seconds per start step, for the "exporting" log
    tunnels: TunnelStore | None = None   # the tunnelled flows' outer addresses and ids (cfg.tunnels)

    def _compile_filters(self, cfg: Config) -> filters.Tables:
        """The kernel tables for cfg.filters, interface names resolved now; FilterError if they don't compile."""
        tables = filters.compile_rules(filters.parse_rules(cfg.filters))
        if tables.unresolved:
            log.warning("filter interface not found: its rules match nothing until it appears",
                        interfaces=list(tables.unresolved))
        return tables

    def _apply_selection(self, cfg: Config, tables: filters.Tables) -> None:
        assert self.datapath is not None
        with self._attach_lock:
            self.datapath.configure(tables, cfg.sampling)

    def _setup_kernel(self) -> None:
        features = (TUNNELS,) if self.cfg.tunnels else ()
        dp = Datapath(max_entries=self.cfg.max_entries, memory_budget=self.cfg.max_kernel_memory,
                      features=features).load()
        self.datapath = dp
        self.startup["compile_and_load"] = round(dp.load_seconds, 3)
        t0 = time.monotonic()
        try:
            try:
                dp.configure(self._compile_filters(self.cfg), self.cfg.sampling)
            except filters.FilterError as e:
                raise LoaderError(str(e)) from None
            attachments.attach_named(dp, self.cfg)
            self._reconcile()
        except BaseException:
            dp.close()
            raise
        self.startup["attach"] = round(time.monotonic() - t0, 3)
        self.pages = Pages(dp)

    def _reconcile(self) -> None:
        """Attach to matching interfaces that appeared, release those that went (hotplug, SIGHUP)."""
        dp = self.datapath
        if dp is None:
            return
        with self._attach_lock:
            self.interfaces = attachments.reconcile(dp, self.cfg, announce=self.pages is not None)
            self.kstats.sync({a.ifname: a.ifindex for a in dp.attachments})

    def _scan(self, drains: list[Drained], now: float, shutdown: bool) -> ScanResult:
        """Worker-thread half of a scan: fold the drained pages' slots into the table, expire."""
        t0 = time.perf_counter()
        table = self.table
        assert table is not None
        now_ms = int(now * 1000)
        offset = clock_offset_ns()
        res = ScanResult(0, 0, 0.0, 0.0)
        for d in drains:
            try:
                if isinstance(table, CoreTable):
                    # The hot path: slots folded straight from the kernel's mapping, in C.
                    folded, packets, octets = table.fold_page(d, offset)
                else:
                    records = merge(d.records(offset))
                    folded, packets, octets = len(records), int(records["packets"].sum()), \
                        int(records["octets"].sum())
                    res.ended.append(table.update(records, now_ms))
                if self.tunnels is not None:
                    self.tunnels.note_windows(zip(d.windows(), d.ext_windows(TUNNELS), strict=True))
            finally:
                d.release()
            res.entries += d.slots
            res.flows += folded
            res.flip_seconds += d.flip_seconds
            res.observed_packets += d.stats["packets"]
            res.observed_octets += d.stats["octets"]
            res.drained_packets += packets
            res.drained_octets += octets
            res.flows_created += d.stats["flows_created"] + d.stats["flows_denied"]
            for name in SELECTION_COUNTERS:
                res.kernel[name] = res.kernel.get(name, 0) + d.stats[name]
        if shutdown and not isinstance(table, CoreTable):
            res.ended.append(table.expire_all(END_FORCED))
        res.seconds = time.perf_counter() - t0
        return res

    @property
    def _no_records(self) -> Records:
        t = self.table
        return np.zeros(0, dtype=t.kind.dtype if isinstance(t, FlowTable) else FLOW_RECORD)

    def _ended(self, res: ScanResult, now_ms: int, shutdown: bool) -> Iterator[Records]:
        """The flows that end this scan, a chunk at a time (the compiled table streams them from one
        buffer, so a scan's records and messages are never all in memory at once)."""
        table = self.table
        if isinstance(table, CoreTable):
            yield from table.expire_chunks(now_ms)
            if shutdown:
                yield from table.expire_all_chunks(END_FORCED)
            return
        yield from (r for r in res.ended if len(r))

    def _drain(self, shutdown: bool) -> list[Drained]:
        assert self.pages is not None and self.datapath is not None
        if shutdown:
            # Detached first: no packet can arrive afterwards. The page being written is then the
            # only one holding anything (every scan released the page it read).
            self.datapath.detach_all()
        return [self.pages.flip()]

    async def scan_once(self, shutdown: bool = False) -> ScanResult:
        t0 = time.perf_counter()
        drains = await asyncio.to_thread(self._drain, shutdown)
        now = time.time()
        res = await asyncio.to_thread(self._scan, drains, now, shutdown)
        self.totals.add(res, int(now * 1000), self.started_ms)
        sent = 0
        datagrams: list[bytes] = []
        # Options records ride with every scan (in its first messages), so collectors see the loss
        # accounting move with the data.
        states = [self._state(ex) for ex in self.exports]
        chunks = self._ended(res, int(now * 1000), shutdown)
        chunk = next(chunks, None)
        first = True
        while chunk is not None or first:
            records = chunk if chunk is not None else self._no_records
            plain, tunnelled = self.tunnels.split(records) if self.tunnels is not None else (records, NO_TUNNELS)
            for ex, state in zip(self.exports, states, strict=True):
                datagrams = ex.encoder.encode(plain, now, options=state if first else None, tunnelled=tunnelled)
                ex.sender.send(datagrams, datagrams.flows, datagrams.totals)
                sent += len(datagrams)
            res.exported += len(records)
            first = False
            chunk = next(chunks, None)
        del chunks, datagrams   # the expiry's buffer and the last chunk's messages go before the trim
        self._prune_tunnels()
        self.scans += 1
        self.records_exported += res.exported
        await asyncio.to_thread(heap.trim)   # the scan's messages are freed: hand their pages back
        assert self.datapath is not None
        stats = self.datapath.read_stats()
        delta = _delta(stats, self._last_stats)
        self._last_stats = stats
        kernel = await asyncio.to_thread(self.kstats.scan)
        self._fill = res.entries / self.cfg.max_entries if not shutdown else self._fill
        self.capacity.note(res, self.cfg.max_entries)
        self._drop_warning.note(kernel)
        if self.metrics is not None:
            m = self.metrics
            m.scan_seconds.observe(time.perf_counter() - t0)
            m.records_exported.inc(res.exported)
            m.ignored_packets.inc(max(0, res.lost_packets))
            m.active_flows.set(len(self.table) if self.table is not None else 0)
            if isinstance(self.table, BiflowTable):
                m.biflow_paired(self.table.paired)
            m.kernel_deltas(kernel)
            for ex in self.exports:
                st = ex.sender.stats
                m.sender_totals(str(ex.sender.endpoint), st.messages, st.octets, st.send_errors,
                                ex.sender.queue_depth)
        log.debug("scan", entries=res.entries, flows=res.flows, exported=res.exported,
                  active=len(self.table) if self.table is not None else 0, datagrams=sent,
                  observed_packets=res.observed_packets, observed_octets=res.observed_octets,
                  ignored_packets=res.ignored_packets, ignored_octets=res.ignored_octets,
                  flip_ms=round(res.flip_seconds * 1000, 2), seconds=round(time.perf_counter() - t0, 4),
                  **{f"kernel_{k}": v for k, v in delta.items()}, **kernel.log_fields())
        return res

    def _prune_tunnels(self) -> None:
        """Entries of flows the table does not hold (it refused them when full) would stay forever."""
        store, table = self.tunnels, self.table
        if store is None or table is None or len(store) <= len(table):
            return
        gone = store.prune(table.flows())
        if gone:
            log.warning("tunnel entries dropped: their flows are not in the flow table (it was full)", entries=gone)

    def _start_metrics(self, host: str, port: int) -> None:
        dp = self.datapath
        assert dp is not None
        self.metrics = Metrics()
        self.metrics.watch_kernel(dp.read_stats, lambda: self._fill,
                                  lambda: {a.ifname: a.mode for a in dp.attachments},
                                  lambda: {e.ifname: e.method for e in dp.egress_attachments})
        self.metrics.watch_selection(dp.rule_counters, lambda: dp.sampling)
        try:
            self.metrics.serve(host, port)
        except OSError as e:
            raise EndpointError(f"metrics endpoint {self.cfg.metrics}: {e.strerror}") from None
        log.info("metrics", url=f"http://{host}:{port}/metrics")

    async def _watch_links(self) -> None:
        while True:
            await self._links_changed.wait()
            await asyncio.sleep(0.2)  # a new veth brings several link events: settle, then look once
            self._links_changed.clear()
            await asyncio.to_thread(self._reconcile)

    async def _apply_reload(self) -> None:
        """SIGHUP: new timeouts, collectors, log level and interface patterns; no re-attach, no flow lost."""
        async with self._reload_lock:  # two quick SIGHUPs must not open the same collector twice
            if self.readiness is not None:
                self.readiness.reloading()
            try:
                await self._reload_once()
            finally:
                self._say_ready()  # metering went on throughout, with the new settings or the old

    async def _reload_once(self) -> None:
        if self.reload is None:
            log.warning("SIGHUP ignored: no configuration file to reload")
            return
        try:
            new = self.reload()
        except Exception as e:  # a bad file must not take the running exporter down
            log.error("reload failed, keeping the running configuration", error=str(e))
            return
        old = self.cfg
        fixed = sorted(k for k in RESTART_ONLY if getattr(new, k) != getattr(old, k))
        if fixed:
            log.warning("these settings take effect only after a restart; keeping the running values",
                        keys=fixed)
            new = replace(new, **{k: getattr(old, k) for k in fixed})
        tables: filters.Tables | None = None
        if (new.filters, new.sampling) != (old.filters, old.sampling):
            try:
                tables = await asyncio.to_thread(self._compile_filters, new)
            except filters.FilterError as e:
                log.error("reload failed, keeping the running configuration", error=str(e))
                return
        if self.table is not None:
            retime(self.table, new.active_timeout, new.idle_timeout)
        keep = {e.sender.endpoint: e for e in self.exports}
        exports = []
        for ep in new.endpoints():
            if ep in keep:
                exports.append(keep.pop(ep))
                continue
            try:
                exports.append(await self._open_export(new, ep))
            except EndpointError as e:
                log.error("collector not added", collector=str(ep), error=str(e))
        for gone in keep.values():
            await gone.sender.close()
        self.exports = exports
        self.cfg = new
        if tables is not None and self.datapath is not None:
            # Map updates only: the program stays attached and the flow pages keep their flows.
            await asyncio.to_thread(self._apply_selection, new, tables)
        await asyncio.to_thread(self._reconcile)
        log.info("reloaded", active_timeout=new.active_timeout, idle_timeout=new.idle_timeout,
                 filters=len(new.filters), sampling=new.sampling,
                 collectors=[str(e.sender.endpoint) for e in self.exports], interfaces=list(new.interfaces),
                 changed=sorted(k for k in vars(new) if _setting(new, k) != _setting(old, k)))

    def _state(self, ex: Export) -> ExporterState:
        st = ex.sender.stats
        dp = self.datapath
        t = self.totals
        return ExporterState(
            not_sent_flows=ex.not_sent.flows, not_sent_packets=ex.not_sent.packets,
            not_sent_octets=ex.not_sent.octets, not_sent_first_ms=ex.not_sent_first_ms,
            not_sent_last_ms=ex.not_sent_last_ms, exported_messages=st.messages, exported_flows=st.records,
            exported_octets=st.octets, observed_packets=t.observed_packets, observed_octets=t.observed_octets,
            ignored_packets=max(0, t.ignored_packets), ignored_octets=max(0, t.ignored_octets),
            ignored_first_ms=t.ignored_first_ms, ignored_last_ms=t.ignored_last_ms,
            frames=t.selection["frames"], selected=t.selected(),
            active_timeout_s=self.cfg.active_timeout, idle_timeout_s=self.cfg.idle_timeout,
            system_init_ms=self.started_ms, sampling_interval=self.cfg.sampling,
            sampling_probability=dp.sampling_probability if dp is not None else 1.0,
            interfaces=self.interfaces)

    def _encoder(self, cfg: Config) -> Encoder:
        # Each collector session is an Exporting Process of its own (RFC 7011 10): the pid tells this
        # process's sessions from a restarted one's, the low byte numbers them.
        self._sessions += 1
        epid = ((os.getpid() << 8) | (self._sessions & 0xFF)) & 0xFFFFFFFF
        return Encoder(odid=cfg.observation_domain, mtu=cfg.mtu, template_refresh_s=cfg.template_refresh,
                       template_refresh_messages=cfg.template_refresh_messages,
                       sequence_mode=cfg.sequence_mode, biflow=cfg.biflow,  # type: ignore[arg-type]
                       per_interface=cfg.egress, tunnels=cfg.tunnels, exporting_process_id=epid)

    @staticmethod
    def _flow_table(cfg: Config) -> FlowTable | CoreTable:
        # Twice the kernel's table: a scan's flows plus those still held from earlier scans.
        capacity = max(2 * cfg.max_entries, 1)
        if cfg.biflow:
            return BiflowTable(cfg.active_timeout, cfg.idle_timeout, capacity, per_interface=cfg.egress)
        if core.available():
            return CoreTable(active_timeout_s=cfg.active_timeout, idle_timeout_s=cfg.idle_timeout, capacity=capacity)
        log.warning("the compiled core is not built: using the numpy flow table, several times slower per flow "
                    "(`pip install .` builds it)", error=core.IMPORT_ERROR)
        return FlowTable(active_timeout_s=cfg.active_timeout, idle_timeout_s=cfg.idle_timeout, capacity=capacity)

    async def _open_export(self, cfg: Config, ep: Endpoint) -> Export:
        export = Export(self._encoder(cfg))
        export.sender = make_sender(
            ep, on_connect=export.on_connect, on_not_sent=export.lost,
            options=StreamOptions(queue_messages=cfg.tcp_queue_size),
            tls=TlsOptions(cafile=cfg.tls_ca, certfile=cfg.tls_cert, keyfile=cfg.tls_key,
                           server_name=cfg.tls_server_name))
        await export.sender.open()
        export.follow_source_address()
        if ep.scheme == "udp":  # streams send templates on each connection (on_connect) instead
            export.sender.send([export.encoder.templates_message(time.time())], [0])
        return export

    def _ready_info(self) -> dict[str, Any]:
        dp = self.datapath
        assert dp is not None
        return {"interfaces": {a.ifname: a.mode for a in dp.attachments},
                "egress": {e.ifname: e.method for e in dp.egress_attachments},
                "collectors": [str(e.sender.endpoint) for e in self.exports],
                "max_entries": self.cfg.max_entries, "scan_interval": self.cfg.scan_interval}

    def _say_ready(self) -> None:
        """READY=1 and the ready file: every configured interface attached, every collector socket open."""
        if self.readiness is None or self.datapath is None:
            return
        info = self._ready_info()
        ifaces = ", ".join(f"{k} ({v})" for k, v in info["interfaces"].items()) or "no interface yet"
        self.readiness.ready(f"metering {ifaces}; exporting to {', '.join(info['collectors'])}",
                             {**info, "startup_seconds": self.startup})

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._apply_reload()))
        watcher: LinkWatcher | None = None
        watch_task: asyncio.Task[None] | None = None
        self.readiness = Readiness(self.cfg.ready_file)
        try:
            t0 = time.monotonic()
            self.exports = [await self._open_export(self.cfg, ep) for ep in self.cfg.endpoints()]
            self.startup["collectors"] = round(time.monotonic() - t0, 3)
            self.table = self._flow_table(self.cfg)
            self.tunnels = TunnelStore() if self.cfg.tunnels else None
            await asyncio.to_thread(self._setup_kernel)
            assert self.datapath is not None
            if (listen := self.cfg.metrics_address()) is not None:
                self._start_metrics(*listen)
            def links_changed() -> None:
                loop.call_soon_threadsafe(self._links_changed.set)

            watcher = LinkWatcher(links_changed).start()
            watch_task = loop.create_task(self._watch_links())
            log.info("exporting", interfaces={a.ifname: a.mode for a in self.datapath.attachments},
                     max_entries=self.cfg.max_entries, kernel_memory=human_bytes(self.datapath.memory_bytes),
                     collectors=[str(e.sender.endpoint) for e in self.exports],
                     scan_interval=self.cfg.scan_interval, active_timeout=self.cfg.active_timeout,
                     idle_timeout=self.cfg.idle_timeout, observation_domain=self.cfg.observation_domain,
                     filters=list(self.cfg.filters), sampling=self.cfg.sampling, biflow=self.cfg.biflow,
                     tunnels=self.cfg.tunnels,
                     egress={e.ifname: e.method for e in self.datapath.egress_attachments},
                     startup_seconds={**self.startup, "since_process_start": round(process_age_seconds(), 3)})
            self._say_ready()
            next_scan = time.monotonic() + self.cfg.scan_interval
            while not self.stop.is_set():
                try:
                    await asyncio.wait_for(self.stop.wait(), timeout=max(0.0, next_scan - time.monotonic()))
                except TimeoutError:
                    pass
                if self.stop.is_set():
                    break
                await self.scan_once()
                self._links_changed.set()  # belt and braces: recheck interfaces every scan
                next_scan += self.cfg.scan_interval
                if next_scan < time.monotonic():  # a scan overran: skip ahead rather than bunch scans up
                    log.warning("scan overran the interval", interval=self.cfg.scan_interval)
                    next_scan = time.monotonic() + self.cfg.scan_interval
            self.readiness.stopping()
            res = await self.scan_once(shutdown=True)
            for ex in self.exports:
                await ex.sender.close()
            kernel = self.datapath.read_stats()
            log.info("stopped", scans=self.scans, records_exported=self.records_exported,
                     filtered_packets=kernel.get("filtered", 0), sampled_out_packets=kernel.get("sampled_out", 0),
                     rules=[[c.action, c.rule, c.packets] for c in self.datapath.rule_counters()],
                     final_records=res.exported, observed_packets=self.totals.observed_packets,
                     observed_octets=self.totals.observed_octets, ignored_packets=self.totals.ignored_packets,
                     ignored_octets=self.totals.ignored_octets,
                     sent={str(e.sender.endpoint): {**vars(e.sender.stats), "not_sent_flows": e.not_sent.flows,
                                                    "not_sent_packets": e.not_sent.packets}
                           for e in self.exports})
            return 0
        finally:
            if watcher is not None:
                watcher.stop()
            if watch_task is not None:
                watch_task.cancel()
            if self.datapath is not None:
                with self._attach_lock:
                    self.datapath.close()
            self.kstats.close()
            self.readiness.close()
            for ex in self.exports:
                await ex.sender.close()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)


def _setting(cfg: Config, key: str) -> object:
    """A setting as the service uses it: collectors by endpoint, so a respelling is no change."""
    return cfg.endpoints() if key == "collectors" else getattr(cfg, key)


def _delta(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in now.items()}


def run(cfg: Config, reload: Callable[[], Config] | None = None) -> int:
    exporter = Exporter(cfg, reload=reload)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(exporter.run())
    return uvloop.run(exporter.run())
