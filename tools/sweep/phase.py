"""One phase of the sweep (one probe at one point) and the sweep's loop over them, on one veth pair.

A phase starts the collector and the probe in the observer namespace and waits until each says
it is ready (a log line, a ready file, a control socket), then trafgen in the generator
namespace; after the warm-up it samples CPU, link counters and memory at both ends of the window,
stops everything in order and turns the readings into one row. At the `max` rate the `none`
phase runs unthrottled and the probes then get the rate it reached, so all see the same traffic.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.jsonlog import find_event
from tools.netns import VethPair, in_netns, link_counters, netns_read
from tools.ready import NotReady, wait_ready
from tools.sweep.figures import derive
from tools.sweep.parsers import (
    CpuTimes,
    machine_cpu,
    others_cpu_seconds,
    parse_softflowd_stats,
    parse_trafgen_packets,
    parse_udp_socket,
)
from tools.sweep.plan import Point, SweepOptions, max_entries_for, plan, runs_at, warmup_seconds
from tools.sweep.processes import Child
from tools.sweep.sink import COLLECTOR_PORT
from tools.sweep.traffic import human_count, profile_flows, rate_label, trafgen_profile

ROOT = Path(__file__).resolve().parents[2]
SETTLE_S = 2.0                    # after the traffic stops, before the probes are stopped


@dataclass
class Snapshot:
    t: float
    cpu: CpuTimes
    probe_cpu: float
    collector_cpu: float
    gen_tx: int
    obs_rx: int
    others_cpu: float = 0.0


class PhaseError(RuntimeError):
    pass


def _wait_started(child: Child, started: Callable[[], bool], timeout: float, poll: float, failure: str) -> None:
    """Return once `started()`; if the child exits or `timeout` passes first, close it and raise PhaseError."""
    deadline = time.monotonic() + timeout
    while not started():
        if not child.alive() or time.monotonic() > deadline:
            out = child.output()
            child.close()
            raise PhaseError(f"{failure}: {out[-400:]}")
        time.sleep(poll)


@dataclass
class Sweep:
    opts: SweepOptions
    workdir: Path
    logdir: Path
    gen: str
    obs: str
    gen_if: str
    obs_if: str
    progress: Callable[[str], None] | None = None   # one-line progress reports

    def _say(self, text: str) -> None:
        if self.progress is not None:
            self.progress(text)

    def _snapshot(self, probe: Child | None, collector: Child | None, ours: set[int]) -> Snapshot:
        cpu = machine_cpu()
        t = time.monotonic()
        others = others_cpu_seconds(ours)
        pc = probe.cpu_now() if probe is not None else 0.0
        cc = collector.cpu_now() if collector is not None else 0.0
        tx = link_counters(self.gen, self.gen_if, ["tx_packets"])["tx_packets"]
        rx = link_counters(self.obs, self.obs_if, ["rx_packets"])["rx_packets"]
        return Snapshot(t, cpu, pc, cc, tx, rx, others)

    def _udp_socket(self, port: int) -> tuple[int, int] | None:
        return parse_udp_socket("\n".join(netns_read(self.obs, "/proc/net/udp")), port)

    def _start_collector(self, tag: str) -> Child:
        child = Child("collector", in_netns(self.obs, [
            sys.executable, "-m", "tools.sweep", "sink", "--port", str(COLLECTOR_PORT)]),
            self.logdir / f"{tag}.collector.log", cwd=ROOT, death_signal=signal.SIGTERM)
        _wait_started(child, lambda: find_event(child.output(), "listening") is not None, 30, 0.1,
                      "collector did not start")
        return child

    def _drain_collector(self, timeout: float = 60.0) -> int:
        """Wait until the collector's socket queue is empty (twice in a row); its drop count."""
        deadline = time.monotonic() + timeout
        empty = 0
        drops = 0
        while time.monotonic() < deadline and empty < 2:
            sock = self._udp_socket(COLLECTOR_PORT)
            if sock is None:
                break
            queue, drops = sock
            empty = empty + 1 if queue == 0 else 0
            time.sleep(0.25)
        return drops

    def _start_xdpflow(self, tag: str, flows: int) -> Child:
        t = self.opts.timers
        ready = self.workdir / f"{tag}.xdpflow.ready"
        child = Child("xdpflow", in_netns(self.obs, [
            sys.executable, "-m", "exporter.cli", "run", "--interface", self.obs_if,
            "--collector", f"udp://127.0.0.1:{COLLECTOR_PORT}", "--scan-interval", str(t.scan_interval),
            "--active-timeout", str(t.active_timeout), "--idle-timeout", str(t.idle_timeout),
            "--mode", self.opts.xdp_mode,
            "--max-entries", str(max_entries_for(flows)), "--max-kernel-memory", "16G",
            "--sequence-mode", "nfdump", "--log-format", "json", "--log-level", "info",
            "--ready-file", str(ready)]),
            self.logdir / f"{tag}.xdpflow.log", cwd=ROOT, death_signal=signal.SIGTERM)
        try:
            wait_ready(ready, child.alive, 180, tail=lambda: child.output().splitlines())
        except NotReady as e:
            child.close()
            raise PhaseError(f"xdpflow did not start: {e}") from None
        return child

    def _start_softflowd(self, tag: str, flows: int) -> tuple[Child, Path]:
        t = self.opts.timers
        ctl = self.workdir / f"{tag}.softflowd.ctl"
        child = Child("softflowd", in_netns(self.obs, [
            "softflowd", "-i", self.obs_if, "-n", f"127.0.0.1:{COLLECTOR_PORT}", "-v", "10", "-d",
            "-m", str(max(8192, flows + flows // 4)), "-B", str(self.opts.softflowd_buffer),
            "-p", str(self.workdir / f"{tag}.softflowd.pid"), "-c", str(ctl),
            "-t", f"maxlife={int(t.active_timeout)}", "-t", f"expint={int(t.scan_interval)}",
            "-t", f"udp={int(t.idle_timeout)}", "-t", f"general={int(t.idle_timeout)}"]),
            self.logdir / f"{tag}.softflowd.log", death_signal=signal.SIGTERM)
        _wait_started(child, ctl.exists, 15, 0.1, "softflowd did not start")
        time.sleep(0.3)
        return child, ctl

    def _start_xdp_empty(self, tag: str) -> Child:
        child = Child("xdp_empty", in_netns(self.obs, [sys.executable, "-m", "tools.sweep", "xdp-empty",
                                                          self.obs_if, self.opts.xdp_mode]),
                      self.logdir / f"{tag}.xdp_empty.log", cwd=ROOT, death_signal=signal.SIGTERM)
        _wait_started(child, lambda: find_event(child.output(), "attached") is not None, 120, 0.2,
                      "empty XDP program did not attach")
        return child

    def _softflowctl(self, ctl: Path, command: str) -> str:
        res = subprocess.run(in_netns(self.obs, ["softflowctl", "-c", str(ctl), command]), capture_output=True,
                             text=True, check=False, timeout=30)
        return res.stdout + res.stderr

    def _start_trafgen(self, tag: str, point: Point, pps: int) -> Child:
        cfg = self.workdir / f"flows-{point.flows}.cfg"
        if not cfg.exists():
            cfg.write_text(trafgen_profile(point.flows), encoding="ascii")
        rate = ["--rate", f"{pps}pps"] if pps else []
        return Child("trafgen", in_netns(self.gen, [
            "trafgen", "--dev", self.gen_if, "--conf", str(cfg), "--cpus", "1", *rate, "--no-sock-mem",
            "--no-cpu-stats", "--notouch-irq"]), self.logdir / f"{tag}.trafgen.log", death_signal=signal.SIGINT)

    def run_phase(self, point: Point, probe: str, rep: int = 0, rate: int | None = None) -> dict[str, Any]:
        """One phase; `rate` overrides the point's packet rate (the calibrated maximum)."""
        tag = f"{point.sweep}-{point.flows}-{rate_label(point.pps)}-{probe}-{rep}"
        warmup = warmup_seconds(self.opts, point)
        rate = point.pps if rate is None else rate
        row: dict[str, Any] = {
            "sweep": point.sweep, "probe": probe, "rep": rep, "flows": profile_flows(point.flows),
            "pps_target": point.pps, "pps_rate": rate, "warmup_s": round(warmup, 1),
        }
        children: list[Child] = []
        collector = probe_proc = gen = None
        ctl: Path | None = None
        t_start = time.monotonic()
        try:
            if probe in ("xdpflow", "softflowd"):
                collector = self._start_collector(tag)
                children.append(collector)
            if probe == "xdpflow":
                probe_proc = self._start_xdpflow(tag, point.flows)
                children.append(probe_proc)
                row["max_entries"] = max_entries_for(point.flows)
                row["kernel_map_mb"] = round(_kernel_map_bytes(max_entries_for(point.flows)) / (1 << 20), 1)
            elif probe == "softflowd":
                probe_proc, ctl = self._start_softflowd(tag, point.flows)
                children.append(probe_proc)
            elif probe == "xdp_empty":
                probe_proc = self._start_xdp_empty(tag)
                children.append(probe_proc)
            ready_cpu = probe_proc.cpu_now() if probe_proc is not None else 0.0
            c0 = {**link_counters(self.gen, self.gen_if, ["tx_packets", "tx_dropped"]),
                  **link_counters(self.obs, self.obs_if, ["rx_packets", "rx_dropped"])}
            gen = self._start_trafgen(tag, point, rate)
            children.append(gen)
            time.sleep(warmup)
            if not gen.alive():
                raise PhaseError(f"trafgen stopped: {gen.output()[-400:]}")
            ours = {os.getsid(0), *(c.pid for c in children)}   # every Child leads its own session
            s0 = self._snapshot(probe_proc, collector, ours)
            time.sleep(self.opts.measure)
            s1 = self._snapshot(probe_proc, collector, ours)
            if probe_proc is not None:
                row["rss_mb"] = round(probe_proc.memory_mb("VmRSS"), 1)
                row["peak_rss_mb"] = round(probe_proc.memory_mb("VmHWM"), 1)
            gen.stop(signal.SIGINT, timeout=15)
            sent = parse_trafgen_packets(gen.output())
            time.sleep(SETTLE_S)   # libpcap hands packets over in blocks: let the last ones reach softflowd
            c1 = {**link_counters(self.gen, self.gen_if, ["tx_packets", "tx_dropped"]),
                  **link_counters(self.obs, self.obs_if, ["rx_packets", "rx_dropped"])}
            window = s1.t - s0.t
            d = s1.cpu - s0.cpu
            row.update({
                "window_s": round(window, 2),
                "pps_sent": round((s1.gen_tx - s0.gen_tx) / window),
                "pps_received": round((s1.obs_rx - s0.obs_rx) / window),
                "machine_busy_cores": round(d.busy / window, 4),
                "others_cpu_cores": round((s1.others_cpu - s0.others_cpu) / window, 4),
                "busy_ours_cores": round((d.busy - (s1.others_cpu - s0.others_cpu)) / window, 4),
                "machine_softirq_cores": round(d.softirq / window, 4),
                "machine_system_cores": round(d.system / window, 4),
                "machine_idle_cores": round((d.idle + d.iowait) / window, 4),
                "probe_cpu_cores": round((s1.probe_cpu - s0.probe_cpu) / window, 4),
                "collector_cpu_cores": round((s1.collector_cpu - s0.collector_cpu) / window, 4),
                "packets_sent": sent if sent is not None else c1["tx_packets"] - c0["tx_packets"],
                "gen_tx_dropped": c1["tx_dropped"] - c0["tx_dropped"],
                "packets_received": c1["rx_packets"] - c0["rx_packets"],
                "obs_rx_dropped": c1["rx_dropped"] - c0["rx_dropped"],
            })
            if probe_proc is not None:
                before_stop = probe_proc.cpu_now()
                if probe == "xdpflow":
                    probe_proc.stop(signal.SIGTERM, timeout=120)
                    stopped = find_event(probe_proc.output(), "stopped") or {}
                    row["observed_packets"] = stopped.get("observed_packets")
                    row["ignored_packets"] = stopped.get("ignored_packets", 0)
                    row["probe_records_exported"] = stopped.get("records_exported")
                    row["probe_scans"] = stopped.get("scans")
                elif probe == "xdp_empty":
                    probe_proc.stop(signal.SIGTERM, timeout=30)
                else:
                    assert ctl is not None
                    stats = parse_softflowd_stats(self._softflowctl(ctl, "statistics"))
                    row["observed_packets"] = stats.get("pcap_received")
                    row["probe_processed_packets"] = stats.get("packets_processed")
                    row["probe_dropped_packets"] = stats.get("pcap_dropped", 0) + stats.get("interface_dropped", 0)
                    self._softflowctl(ctl, "shutdown")
                    if not probe_proc.wait(60):
                        probe_proc.stop(signal.SIGTERM, timeout=10)
                    row["ignored_packets"] = 0
                total = probe_proc.cpu_now()
                row["probe_cpu_total_s"] = round(total - ready_cpu, 3)
                row["probe_shutdown_cpu_s"] = round(total - before_stop, 3)
                row["probe_exit"] = probe_proc.returncode
            if collector is not None:
                row["collector_socket_drops"] = self._drain_collector()
                collector.stop(signal.SIGTERM, timeout=300)
                totals = find_event(collector.output(), "summary")
                if totals is None:
                    raise PhaseError(f"collector gave no summary: {collector.output()[-400:]}")
                row["collector_records"] = totals["records"]
                row["collector_packets"] = totals["packets"]
                row["collector_reported_ignored"] = totals["ignored_packets"]
                row["collector_malformed"] = totals["malformed"]
                # The exporter's ignored count arrives in its options records; take the larger of the two
                # views (the stopped log line is written after the last options record).
                ignored = max(int(row.get("ignored_packets") or 0), totals["ignored_packets"])
                accounted = totals["packets"] + ignored
                row["accounted_packets"] = accounted
                row["accounted_ratio"] = round(accounted / row["packets_sent"], 5) if row["packets_sent"] else None
        finally:
            for child in reversed(children):
                child.close()
        row["phase_s"] = round(time.monotonic() - t_start, 1)
        return row

    def run(self, points: Iterable[Point]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for rep in range(self.opts.repeat):
            for point in points:
                # At "max", the no-probe phase runs unthrottled and the probes then get the rate it reached,
                # so all three see the same traffic (a probe that slows trafgen shows as a lower pps_sent).
                rate: int | None = None
                for probe in self.opts.probes:
                    if not runs_at(probe, point):
                        continue
                    self._say(f"sweep {point.sweep}: {human_count(point.flows)} flows at {rate_label(point.pps)}"
                              f"{f' ({rate} pps)' if rate else ''}, {probe} (rep {rep})")
                    try:
                        row = self.run_phase(point, probe, rep, rate)
                    except (PhaseError, OSError, subprocess.SubprocessError) as e:
                        row = {"sweep": point.sweep, "probe": probe, "rep": rep,
                               "flows": profile_flows(point.flows), "pps_target": point.pps, "error": str(e)[-300:]}
                        self._say(f"  failed: {row['error']}")
                    if point.pps == 0 and probe == "none" and row.get("pps_sent"):
                        rate = int(row["pps_sent"])
                    rows.append(row)
                    self._say("  " + ", ".join(f"{k}={row[k]}" for k in (
                        "pps_sent", "machine_busy_cores", "probe_cpu_cores", "rss_mb", "accounted_ratio",
                        "collector_records") if k in row))
        return derive(rows)


def _kernel_map_bytes(max_entries: int) -> int:
    from xdp.loader import map_memory_bytes

    return map_memory_bytes(max_entries)


def run_sweep(opts: SweepOptions, workdir: Path, logdir: Path,
              progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The whole sweep on one veth pair; namespaces and children gone on return, whatever happened."""
    logdir.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    with VethPair() as pair:
        sweep = Sweep(opts, workdir, logdir, pair.gen, pair.obs, pair.gen_if, pair.obs_if, progress)
        return sweep.run(plan(opts))
