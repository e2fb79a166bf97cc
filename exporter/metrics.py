"""Prometheus metrics, off unless --metrics HOST:PORT is given (loopback by default).

A private registry (no process-wide default collectors, no surprises when two
exporters share a process in tests). Kernel counters are cumulative in the
per-CPU stats map, so they are exported as they are read each scan, through a
custom collector rather than by incrementing client-side counters; everything
the exporter itself does (records, messages, errors, scan time) is counted as
it happens. The kernel's own counters for attached interfaces and CPUs (exporter.kstats:
who dropped what) move once per scan, by the deltas the scan read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter.kstats import KernelDelta

KERNEL_COUNTERS = {
    "frames": "Frames the XDP program ran on",
    "packets": "IP packets metered (observed)",
    "octets": "IP octets metered (observed)",
    "flows_created": "Flow entries created in the kernel",
    "parse_failures": "Malformed or truncated frames passed without metering",
    "parse_failure_octets": "Octets of the malformed frames, from the network header on",
    "non_ip": "Frames that are not IPv4/IPv6",
    "insert_failures": "Metered packets no flow page could hold",
    "insert_failure_octets": "Octets of metered packets no flow page could hold",
    "filtered": "IP packets a filter rule excluded (passed on, not metered)",
    "filtered_octets": "IP octets of packets a filter rule excluded",
    "sampled_out": "IP packets the sampler skipped (passed on, not metered)",
    "sampled_out_octets": "IP octets of packets the sampler skipped",
    "tunnel_decapsulated": "Tunnel packets metered as their inner flow (tunnels = true)",
    "tunnel_malformed": "Tunnel packets whose inner headers did not parse: metered as the outer flow",
}
# The kernel's and the driver's counters for each attached interface (IFLA_STATS64, ethtool), since attach.
NETDEV_COUNTERS = {
    "rx_packets": "Frames the interface received (kernel counter)",
    "rx_dropped": "Received frames the kernel dropped (backlog full, forward refused): not xdpflow",
    "rx_missed_errors": "Frames the NIC had no buffer for, lost before XDP",
    "rx_fifo_errors": "Frames lost to a NIC FIFO overrun, before XDP",
    "rx_over_errors": "Frames lost to a receive ring overflow, before XDP",
    "rx_errors": "Bad frames the interface received (CRC, length, overruns)",
    "tx_packets": "Frames the interface sent (kernel counter)",
    "tx_dropped": "Frames the kernel dropped on transmit (veth: the peer could not take them)",
    "tx_errors": "Transmit errors",
}
DRIVER_COUNTERS = {
    "xdp_packets": "Frames the native XDP program ran on, as the driver counts them (0: not counted)",
    "xdp_drops": "XDP_DROP verdicts the driver counted (xdpflow never drops)",
}
RULE_LABEL_MAX = 200  # a rule listing a thousand CIDRs still gets a readable label


class RuleCounter(Protocol):
    """One filter rule's totals (xdp.rules.RuleCount)."""

    @property
    def rule(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def packets(self) -> int: ...
    @property
    def octets(self) -> int: ...


def rule_label(rule: str) -> str:
    return rule if len(rule) <= RULE_LABEL_MAX else rule[: RULE_LABEL_MAX - 3] + "..."


@dataclass(eq=False)  # registries keep collectors in a set: identity hashing
class _KernelView(Collector):
    read: Callable[[], dict[str, int]]
    fill: Callable[[], float]
    modes: Callable[[], dict[str, str]]
    egress: Callable[[], dict[str, str]] = dict

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.read()
        for name, help_text in KERNEL_COUNTERS.items():
            c = CounterMetricFamily(f"xdpflow_kernel_{name}", help_text)
            c.add_metric([], stats.get(name, 0))
            yield c
        g = GaugeMetricFamily("xdpflow_kernel_map_fill_ratio",
                              "Entries drained in the last scan / max_entries of a page")
        g.add_metric([], self.fill())
        yield g
        m = GaugeMetricFamily("xdpflow_attached", "1 per attached interface, labelled with the XDP mode obtained",
                              labels=["interface", "mode"])
        for ifname, mode in self.modes().items():
            m.add_metric([ifname, mode], 1)
        yield m
        e = GaugeMetricFamily("xdpflow_egress_attached",
                              "1 per interface metered at egress (--egress), labelled tcx (bpf_link) or tc (clsact)",
                              labels=["interface", "method"])
        for ifname, method in self.egress().items():
            e.add_metric([ifname, method], 1)
        yield e

    def describe(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        return []


@dataclass(eq=False)
class _SelectionView(Collector):
    """Per-rule counters (cumulative in the kernel's per-CPU maps) and the sampling interval."""

    rules: Callable[[], Sequence[RuleCounter]]
    sampling: Callable[[], int]

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        labels = ["index", "rule", "action"]
        p = CounterMetricFamily("xdpflow_filter_rule_packets",
                                "IP packets a filter rule decided (first match); rule \"(no match)\": "
                                "no rule matched and the default action applied", labels=labels)
        o = CounterMetricFamily("xdpflow_filter_rule_octets", "IP octets of the packets a filter rule decided",
                                labels=labels)
        for i, c in enumerate(self.rules()):
            key = [str(i), rule_label(c.rule), c.action]
            p.add_metric(key, c.packets)
            o.add_metric(key, c.octets)
        yield p
        yield o
        g = GaugeMetricFamily("xdpflow_sampling_interval", "Packets observed per packet metered (1: no sampling)")
        g.add_metric([], self.sampling())
        yield g

    def describe(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        return []


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r = self.registry
        self.records_exported = Counter("xdpflow_records_exported", "Flow records handed to the encoder",
                                        registry=r)
        self.ignored_packets = Counter("xdpflow_ignored_packets",
                                       "Packets metered by the kernel that no exported record holds", registry=r)
        self.messages = Counter("xdpflow_messages_sent", "IPFIX messages sent", ["collector"], registry=r)
        self.octets = Counter("xdpflow_octets_sent", "IPFIX octets sent", ["collector"], registry=r)
        self.send_errors = Counter("xdpflow_send_errors", "Send errors", ["collector"], registry=r)
        self.queue_depth = Gauge("xdpflow_queue_depth", "Messages waiting for a collector", ["collector"],
                                 registry=r)
        self.active_flows = Gauge("xdpflow_active_flows", "Flows held in the user-space flow table", registry=r)
        self.biflow_reverse = Counter("xdpflow_biflow_reverse_uniflows",
                                      "Uniflows folded in as the reverse side of a conversation (--biflow)",
                                      registry=r)
        self.scan_seconds = Histogram("xdpflow_scan_seconds", "Duration of one scan (drain to send)", registry=r,
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self._sent: dict[str, tuple[int, int, int]] = {}
        self._paired = 0
        self.netdev = {k: Counter(f"xdpflow_netdev_{k}", h, ["interface"], registry=r)
                       for k, h in NETDEV_COUNTERS.items()}
        self.netdev |= {k: Counter(f"xdpflow_driver_{k}", h, ["interface"], registry=r)
                        for k, h in DRIVER_COUNTERS.items()}
        self.softnet_dropped = Counter("xdpflow_softnet_dropped",
                                       "Frames dropped because this CPU's backlog was full (softnet_stat, "
                                       "whole machine)", ["cpu"], registry=r)
        self.softnet_time_squeeze = Counter("xdpflow_softnet_time_squeeze",
                                            "NAPI runs stopped with work left on this CPU (softnet_stat, "
                                            "whole machine; deferred, not lost)", ["cpu"], registry=r)

    def watch_kernel(self, read: Callable[[], dict[str, int]], fill: Callable[[], float],
                     modes: Callable[[], dict[str, str]], egress: Callable[[], dict[str, str]] = dict) -> None:
        self.registry.register(_KernelView(read, fill, modes, egress))

    def watch_selection(self, rules: Callable[[], Sequence[RuleCounter]], sampling: Callable[[], int]) -> None:
        self.registry.register(_SelectionView(rules, sampling))

    def sender_totals(self, collector: str, messages: int, octets: int, errors: int, queue: int) -> None:
        """Senders keep cumulative totals; turn them into counter increments."""
        m0, o0, e0 = self._sent.get(collector, (0, 0, 0))
        self.messages.labels(collector).inc(max(0, messages - m0))
        self.octets.labels(collector).inc(max(0, octets - o0))
        self.send_errors.labels(collector).inc(max(0, errors - e0))
        self.queue_depth.labels(collector).set(queue)
        self._sent[collector] = (messages, octets, errors)

    def biflow_paired(self, total: int) -> None:
        """The biflow table counts uniflows paired since start; turn that into counter increments."""
        self.biflow_reverse.inc(max(0, total - self._paired))
        self._paired = total

    def kernel_deltas(self, delta: KernelDelta) -> None:
        """One scan's kernel counters; interfaces no longer attached lose their series."""
        for ifname, counters in delta.interfaces.items():
            for k, c in self.netdev.items():
                c.labels(ifname).inc(getattr(counters, k))
        for cpu in delta.softnet:
            self.softnet_dropped.labels(str(cpu.cpu)).inc(cpu.dropped)
            self.softnet_time_squeeze.labels(str(cpu.cpu)).inc(cpu.time_squeeze)
        for ifname in delta.released:
            for c in self.netdev.values():
                try:
                    c.remove(ifname)
                except KeyError:
                    pass

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

