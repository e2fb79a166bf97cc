"""`xdpflow bench sweep`: real traffic, both probes, one run.

A veth pair joins two throw-away namespaces (tools.netns.VethPair): trafgen
sends from the generator end, the probes meter the observer end, and the
collector listens on the observer namespace's loopback, so no generated frame
or export leaves them. Each point of the sweep (concurrent flows x packet
rate) runs three phases on identical traffic, one after the other:

- `none`: the traffic alone, nothing attached (the reference for overhead);
- `xdpflow`: `xdpflow run` (native XDP on the veth) exporting IPFIX;
- `softflowd`: softflowd (libpcap) exporting IPFIX,

both to the same accounting collector (`python -m tools.sweep sink`: it
holds datagrams during the run and tallies them with the project's decoder
after the stop, with a 256 MiB socket buffer so the end-of-run burst of a
million records is not lost at the collector).

Traffic is one trafgen packet whose UDP ports step through two coprime dinc
counters, so `flows` distinct 5-tuples repeat round robin at the given rate
(0 = as fast as trafgen goes on one CPU). After a warm-up (one full cycle of
the flows plus a scan), a window of `measure` seconds is sampled:

- probe CPU: user+sys of the probe's process (/proc/PID/stat), in cores;
- machine busy CPU: /proc/stat (user, nice, system, irq, softirq, steal), so
  the kernel's per-packet work in softirq counts. Other jobs share the
  machine, so the CPU of every process outside this run's sessions is taken
  out (busy_ours); probe overhead is the phase's busy_ours minus the `none`
  phase's, minus the collector's own CPU. Other jobs' softirq time cannot be
  told apart and stays in as noise (overhead_raw_cores keeps the plain
  difference of machine busy CPU);
- RSS (VmRSS at the end of the window) and peak RSS (VmHWM).

After the window the traffic stops and the probe is stopped the way an
operator would (SIGTERM for xdpflow, `softflowctl shutdown` for softflowd),
so both export everything they hold. Then the packets trafgen sent are set
against the packets the collector accounts: the packet counts of the records
it received, plus, for xdpflow, the packets it reports as ignored (LRU
evictions, failed inserts: ignoredPacketTotalCount in its options records,
and the `stopped` log line).

Every child runs in its own session and is stopped (then killed) in
`finally`; the namespaces go with the VethPair context.

The package, one module a part: traffic (the trafgen profile and labels),
parsers (/proc and the tools' summaries), sink (the accounting collector),
processes (Child), plan (points, probes, timers, warm-up), phase (one phase
and the sweep's loop), figures (overhead and the side-by-side lines),
xdp_empty (the control probe); __main__ starts the sink and the control
probe as children. The names other modules use are importable from here.
"""

from tools.sweep.figures import derive, pivot
from tools.sweep.parsers import (
    CLK_TCK,
    CpuTimes,
    idle_noise,
    machine_cpu,
    others_cpu_seconds,
    parse_pid_stat,
    parse_pid_stat_fields,
    parse_proc_stat,
    parse_schedstat_ns,
    parse_softflowd_stats,
    parse_status_mb,
    parse_trafgen_packets,
    parse_udp_socket,
    process_cpu_seconds,
)
from tools.sweep.phase import PhaseError, Snapshot, Sweep, run_sweep
from tools.sweep.plan import (
    FLOWS_FULL,
    FLOWS_SHORT,
    PROBES,
    RATE_SWEEP_FLOWS,
    RATES,
    Point,
    SweepOptions,
    Timers,
    estimate_seconds,
    max_entries_for,
    plan,
    runs_at,
    warmup_seconds,
)
from tools.sweep.processes import Child, with_death_signal
from tools.sweep.sink import COLLECTOR_PORT, SINK_BUFFER, Tally, sink_main
from tools.sweep.traffic import MAX_PORT_CYCLE, flow_grid, human_count, profile_flows, rate_label, trafgen_profile
from tools.sweep.xdp_empty import EMPTY_XDP, xdp_empty_main

__all__ = [
    "CLK_TCK", "COLLECTOR_PORT", "EMPTY_XDP", "FLOWS_FULL", "FLOWS_SHORT", "MAX_PORT_CYCLE", "PROBES", "RATES",
    "RATE_SWEEP_FLOWS", "SINK_BUFFER", "Child", "CpuTimes", "PhaseError", "Point", "Snapshot", "Sweep",
    "SweepOptions", "Tally", "Timers", "derive", "estimate_seconds", "flow_grid", "human_count", "idle_noise",
    "machine_cpu", "max_entries_for", "others_cpu_seconds", "parse_pid_stat", "parse_pid_stat_fields",
    "parse_proc_stat", "parse_schedstat_ns", "parse_softflowd_stats", "parse_status_mb", "parse_trafgen_packets",
    "parse_udp_socket", "pivot", "plan", "process_cpu_seconds", "profile_flows", "rate_label", "run_sweep",
    "runs_at", "sink_main", "trafgen_profile", "warmup_seconds", "with_death_signal", "xdp_empty_main",
]
