"""The sweep's plan: which points (concurrent flows x packet rate) it runs, which probes run at each,
and how long each phase warms up.

A flow sweep at a fixed rate, then a rate sweep at a fixed flow count (RATE_SWEEP_FLOWS), a point
in both run once. Every probe gets the same timers, so both export every flow as often. A phase
warms up for one full cycle of the flows plus a scan before its window opens, so the window sees
the steady state; the empty-XDP control probe runs at the maximum rate only, where per-packet costs
show.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tools.sweep.traffic import profile_flows

PROBES = ("none", "xdp_empty", "xdpflow", "softflowd")
FLOWS_FULL = (1, 10, 100, 1_000, 10_000, 100_000, 500_000, 1_000_000)
FLOWS_SHORT = (100, 10_000, 1_000_000)
RATES = (10_000, 100_000, 0)      # the packet-rate sweep at RATE_SWEEP_FLOWS; 0 = as fast as trafgen goes
RATE_SWEEP_FLOWS = 1_000


@dataclass(frozen=True)
class Timers:
    """The same timers for both probes, so both export every flow as often."""

    scan_interval: float = 5.0
    active_timeout: float = 15.0
    idle_timeout: float = 15.0


@dataclass(frozen=True)
class Point:
    sweep: str      # "flows" (fixed rate) or "rate" (fixed flows)
    flows: int
    pps: int        # 0 = as fast as trafgen goes


@dataclass
class SweepOptions:
    flows: tuple[int, ...] = FLOWS_FULL
    pps: int = 100_000
    rates: tuple[int, ...] = RATES
    rate_flows: int = RATE_SWEEP_FLOWS
    measure: float = 30.0
    min_warmup: float = 3.0
    probes: tuple[str, ...] = PROBES
    repeat: int = 1
    timers: Timers = field(default_factory=Timers)
    softflowd_buffer: int = 8 << 20   # libpcap buffer for softflowd (-B)
    xdp_mode: str = "native"          # xdpflow's and the control program's XDP mode (native or generic)
    max_rate_guess: int = 1_000_000   # for the warm-up at rate 0

    @classmethod
    def short(cls) -> SweepOptions:
        return cls(flows=FLOWS_SHORT, measure=10.0)


def plan(opts: SweepOptions) -> list[Point]:
    """Flow sweep at the fixed rate, then the rate sweep at a fixed flow count; duplicates once."""
    points = [Point("flows", f, opts.pps) for f in opts.flows]
    points += [Point("rate", opts.rate_flows, r) for r in opts.rates]
    seen: set[tuple[int, int]] = set()
    out = []
    for p in points:
        if (p.flows, p.pps) not in seen:
            seen.add((p.flows, p.pps))
            out.append(p)
    return out


def warmup_seconds(opts: SweepOptions, point: Point) -> float:
    """One full cycle of the flows plus one scan, so the window sees the steady state."""
    pps = point.pps or opts.max_rate_guess
    cycle = profile_flows(point.flows) / pps
    return max(opts.min_warmup, cycle + opts.timers.scan_interval if cycle > 1 else opts.min_warmup)


def runs_at(probe: str, point: Point) -> bool:
    """The empty-XDP control runs at the maximum rate only, where per-packet costs show."""
    return probe != "xdp_empty" or point.pps == 0


def max_entries_for(flows: int) -> int:
    """Kernel table size: the exporter's default, or the flows with LRU headroom above it."""
    return max(500_000, flows + flows // 4 + 1024)


def estimate_seconds(opts: SweepOptions) -> float:
    per_phase_overhead = {"none": 2.5, "xdp_empty": 6.0, "xdpflow": 7.0, "softflowd": 5.0}
    total = 0.0
    for p in plan(opts):
        for probe in opts.probes:
            if runs_at(probe, p):
                total += warmup_seconds(opts, p) + opts.measure + per_phase_overhead[probe]
    return total * opts.repeat
