"""What one scan counted, what the exporter has counted since it started, and when to say the
kernel table is too small.

A scan drains one page: the kernel's counters for that page's interval (struct flow_stats,
taken at the flip) and what its slots held are exact for the same interval, so their difference
is exact too: packets metered but in no slot (the page ran out of slots) plus malformed IP
headers are the ignored packets of RFC 5101's metering statistics. `Totals` adds the scans up
for the options records (templates 260, 261, 268); `CapacityWarning` turns lost packets into one
warning a minute that names a max_entries that would have held the peak.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import structlog

from exporter.records import Records
from xdp.loader import map_memory_bytes
from xdp.sizing import human_bytes

log = structlog.get_logger("xdpflow.service")

# The kernel's per-page counters (struct flow_stats) the options records total up.
SELECTION_COUNTERS = ("frames", "non_ip", "filtered", "sampled_out", "parse_failures", "parse_failure_octets")

CAPACITY_WARNING_INTERVAL = 60.0


@dataclass
class ScanResult:
    entries: int
    flows: int
    flip_seconds: float
    seconds: float
    exported: int = 0           # flow records ended and handed to the encoders this scan
    observed_packets: int = 0   # the kernel's count for the drained pages' interval
    observed_octets: int = 0
    drained_packets: int = 0    # what the drained entries held
    drained_octets: int = 0
    flows_created: int = 0      # slots the drained pages' interval needed (taken + denied)
    ended: list[Records] = field(default_factory=list)   # the numpy tables: what their update ended
    kernel: dict[str, int] = field(default_factory=dict)  # SELECTION_COUNTERS for the same interval

    @property
    def lost_packets(self) -> int:
        """Metered but in no slot: the page ran out of slots (exact: same interval)."""
        return self.observed_packets - self.drained_packets

    @property
    def ignored_packets(self) -> int:
        """Selected but in no record (ignoredPacketTotalCount): no slot, or a malformed IP header."""
        return self.lost_packets + self.kernel.get("parse_failures", 0)

    @property
    def ignored_octets(self) -> int:
        return self.observed_octets - self.drained_octets + self.kernel.get("parse_failure_octets", 0)


@dataclass
class Totals:
    """The scans added up since start: what the metering, reliability and selection options report."""

    observed_packets: int = 0
    observed_octets: int = 0
    ignored_packets: int = 0
    ignored_octets: int = 0
    ignored_first_ms: int = 0   # the scan intervals the first and the latest ignored packet fell in
    ignored_last_ms: int = 0
    selection: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SELECTION_COUNTERS, 0))
    interval_start_ms: int = 0  # when the page drained next began (0: at start)

    def add(self, res: ScanResult, now_ms: int, started_ms: int) -> None:
        """Add a scan's counters; `now_ms`: the flip's time, `started_ms`: the exporter's start."""
        self.observed_packets += res.observed_packets
        self.observed_octets += res.observed_octets
        self.ignored_packets += res.ignored_packets
        self.ignored_octets += res.ignored_octets
        for name, n in res.kernel.items():
            self.selection[name] += n
        start = self.interval_start_ms or started_ms
        if res.ignored_packets > 0:
            # The counters are per page: an ignored packet is known to lie in the page's interval only.
            self.ignored_first_ms = self.ignored_first_ms or start
            self.ignored_last_ms = now_ms
        self.interval_start_ms = now_ms

    def selected(self) -> tuple[int, int, int]:
        """selectorIdTotalPktsSelected after each selector: IP frames, the filter rules, the sampler."""
        k = self.selection
        ip = k["frames"] - k["non_ip"]
        return ip, ip - k["filtered"], ip - k["filtered"] - k["sampled_out"]


@dataclass
class CapacityWarning:
    """Says, at most once a minute, that the kernel table is too small and what would fit."""

    last_warning: float = float("-inf")   # time.monotonic() of the last warning
    lost_since_warning: int = 0
    peak_created: int = 0

    def note(self, res: ScanResult, max_entries: int) -> None:
        if res.lost_packets <= 0:
            return
        self.lost_since_warning += res.lost_packets
        self.peak_created = max(self.peak_created, res.flows_created)
        now = time.monotonic()
        if now - self.last_warning < CAPACITY_WARNING_INTERVAL:
            return
        # Headroom: flows per scan grow between warnings, and a flow seen by two CPUs takes two slots.
        suggest = int(self.peak_created * 1.25) + 1024
        log.warning("kernel flow table too small: flows found no free slot", lost_packets=self.lost_since_warning,
                    flows_per_scan=self.peak_created, max_entries=max_entries,
                    suggested_max_entries=suggest,
                    suggested_kernel_memory=human_bytes(map_memory_bytes(suggest)))
        self.last_warning = now
        self.lost_since_warning = 0
        self.peak_created = 0
