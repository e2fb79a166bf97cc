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
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tools.jsonlog import find_event
from tools.netns import in_netns, link_counters, netns_read
from tools.ready import NotReady, wait_ready

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROBES = ("none", "xdp_empty", "xdpflow", "softflowd")
EMPTY_XDP = "int empty(struct xdp_md *ctx) { return XDP_PASS; }\n"
COLLECTOR_PORT = 9995
SETTLE_S = 2.0                    # after the traffic stops, before the probes are stopped
SINK_BUFFER = 256 << 20           # the accounting collector's socket buffer (SO_RCVBUFFORCE)
MAX_PORT_CYCLE = 60_000           # longest dinc cycle used for one port
FLOWS_FULL = (1, 10, 100, 1_000, 10_000, 100_000, 500_000, 1_000_000)
FLOWS_SHORT = (100, 10_000, 1_000_000)
RATES = (10_000, 100_000, 0)      # the packet-rate sweep at RATE_SWEEP_FLOWS; 0 = as fast as trafgen goes
RATE_SWEEP_FLOWS = 1_000


# ---------------------------------------------------------------- traffic profiles

def flow_grid(flows: int) -> tuple[int, int]:
    """Two coprime cycle lengths a x b == flows (or just above) for trafgen's dinc counters."""
    if flows < 1:
        raise ValueError(f"flows must be >= 1, got {flows}")
    if flows <= MAX_PORT_CYCLE:
        return flows, 1
    b = 2
    while True:
        a = -(-flows // b)
        if math.gcd(a, b) == 1 and a <= MAX_PORT_CYCLE:
            return a, b
        b += 1


def _counter(n: int, fixed: int) -> str:
    return f"dinc(1, {n})" if n > 1 else str(fixed)


def trafgen_profile(flows: int, payload: int = 18) -> str:
    """One trafgen packet whose UDP ports step through `flows` distinct pairs (dinc counters).

    Both counters advance on every packet; their cycle lengths are coprime, so
    the (source, destination) port pair repeats only after a x b packets.
    """
    a, b = flow_grid(flows)
    return ("{ eth(da=02:00:00:00:00:02, sa=02:00:00:00:00:01), ipv4(saddr=198.18.0.1, daddr=198.19.0.1), "
            f"udp(sp={_counter(a, 1)}, dp={_counter(b, 53)}), fill(0, {payload}) }}\n")


def profile_flows(flows: int) -> int:
    """How many distinct flows trafgen_profile(flows) really produces."""
    a, b = flow_grid(flows)
    return a * b


def human_count(n: float) -> str:
    """1 -> '1', 1000 -> '1K', 500000 -> '500K', 1000000 -> '1M' (for labels)."""
    for div, unit in ((1_000_000, "M"), (1_000, "K")):
        if n >= div:
            return f"{n / div:g}{unit}"
    return f"{n:g}"


def rate_label(pps: int) -> str:
    return "max" if pps == 0 else f"{human_count(pps)}pps"


# ---------------------------------------------------------------- /proc parsers (pure)

@dataclass(frozen=True)
class CpuTimes:
    """The aggregate `cpu` line of /proc/stat, in seconds (guest time is already inside user)."""

    user: float = 0.0
    nice: float = 0.0
    system: float = 0.0
    idle: float = 0.0
    iowait: float = 0.0
    irq: float = 0.0
    softirq: float = 0.0
    steal: float = 0.0

    @property
    def total(self) -> float:
        return self.user + self.nice + self.system + self.idle + self.iowait + self.irq + self.softirq + self.steal

    @property
    def busy(self) -> float:
        return self.total - self.idle - self.iowait

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        a, b = asdict(self), asdict(other)
        return CpuTimes(**{k: a[k] - b[k] for k in a})


def parse_proc_stat(text: str, clk_tck: int = CLK_TCK) -> CpuTimes:
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) / clk_tck for v in parts[1:9]]
            values += [0.0] * (8 - len(values))
            return CpuTimes(*values)
    raise ValueError("no aggregate cpu line in /proc/stat text")


def parse_pid_stat(text: str, clk_tck: int = CLK_TCK) -> float:
    """user + system CPU seconds of a process from /proc/PID/stat (comm may hold spaces and parentheses)."""
    fields = text.rsplit(")", 1)[1].split()
    # fields[0] is state (field 3 of proc(5)); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / clk_tck


def parse_schedstat_ns(text: str) -> int:
    """Time on CPU in ns, the first field of /proc/PID/task/TID/schedstat."""
    return int(text.split(maxsplit=1)[0])


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds of a live process: the sum of its threads' schedstat run time (ns resolution), or
    utime+stime from /proc/PID/stat (clock-tick resolution) where schedstat is missing."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += parse_schedstat_ns((task / "schedstat").read_text(encoding="ascii"))
            except (OSError, IndexError, ValueError):
                continue
    except OSError:
        return 0.0
    if total:
        return total / 1e9
    try:
        return parse_pid_stat(Path(f"/proc/{pid}/stat").read_text(encoding="ascii"))
    except (OSError, IndexError, ValueError):
        return 0.0


def parse_pid_stat_fields(text: str) -> tuple[int, int, float]:
    """(ppid, session, CPU seconds of the process and its reaped children) from /proc/PID/stat text."""
    f = text.rsplit(")", 1)[1].split()
    return int(f[1]), int(f[3]), (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / CLK_TCK


def others_cpu_seconds(ours: set[int], proc: Path = Path("/proc")) -> float:
    """CPU seconds of every user-space process outside the sessions in `ours` (other jobs on the machine).

    Reaped children count through their parent (cutime/cstime). Kernel threads (children of kthreadd)
    are left out: ksoftirqd and kworkers may be doing our packets' work.
    """
    total = 0.0
    for entry in proc.iterdir():
        if not entry.name.isdigit() or entry.name == "2":
            continue
        try:
            ppid, session, cpu = parse_pid_stat_fields((entry / "stat").read_text(encoding="ascii",
                                                                                    errors="replace"))
        except (OSError, IndexError, ValueError):
            continue
        if ppid == 2 or session in ours:
            continue
        total += cpu
    return total


def parse_status_mb(text: str, key: str = "VmRSS") -> float:
    """A kB field of /proc/PID/status in MiB (0.0 when absent, e.g. a zombie)."""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def parse_trafgen_packets(text: str) -> int | None:
    """trafgen's exit summary: '   500178 packets outgoing'."""
    m = re.findall(r"^\s*(\d+) packets outgoing", text, re.MULTILINE)
    return int(m[-1]) if m else None


def parse_softflowd_stats(text: str) -> dict[str, int]:
    """`softflowctl statistics`: packets processed, libpcap received/dropped, flows exported."""
    patterns = {
        "active_flows": r"Number of active flows: (\d+)",
        "packets_processed": r"Packets processed: (\d+)",
        "pcap_received": r"Packets received by libpcap: (\d+)",
        "pcap_dropped": r"Packets dropped by libpcap: (\d+)",
        "interface_dropped": r"Packets dropped by interface: (\d+)",
        "flows_exported": r"Flows exported: (\d+)",
        "flows_expired": r"Flows expired: (\d+)",
    }
    out = {}
    for name, pat in patterns.items():
        m = re.search(pat, text)
        if m:
            out[name] = int(m.group(1))
    return out


def parse_udp_socket(text: str, port: int) -> tuple[int, int] | None:
    """(rx_queue bytes, drops) of the socket bound to `port` in /proc/net/udp text."""
    for row in text.splitlines()[1:]:
        cols = row.split()
        if len(cols) < 13:
            continue
        local = cols[1]
        if int(local.rsplit(":", 1)[1], 16) == port:
            rx_queue = int(cols[4].split(":")[1], 16)
            return rx_queue, int(cols[12])
    return None


# ---------------------------------------------------------------- the accounting collector

_PACKET_IES = (2, 86)    # packetDeltaCount, packetTotalCount
_OCTET_IES = (1, 85)     # octetDeltaCount, octetTotalCount
_IGNORED_PACKETS = "ignoredPacketTotalCount"


@dataclass
class Tally:
    """Packet and record totals of an IPFIX stream, fast enough for millions of records.

    Datagrams holding templates, options data or anything unusual go through
    the project's RFC 7011 decoder (collectors.decoder); plain data sets of a
    known fixed-length template are summed with numpy straight from the set
    body. The last ignoredPacketTotalCount seen per session is the exporter's
    reported loss.
    """

    datagrams: int = 0
    records: int = 0
    packets: int = 0
    octets: int = 0
    options_records: int = 0
    slow_datagrams: int = 0
    malformed: int = 0
    ignored: dict[tuple[str, int], int] = field(default_factory=dict)
    _decoder: Any = None
    _dtypes: dict[tuple[str, int, int], Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from collectors.decoder import Decoder

        self._decoder = Decoder(count_options=False)

    @property
    def ignored_packets(self) -> int:
        return sum(self.ignored.values())

    def summary(self) -> dict[str, int]:
        return {"datagrams": self.datagrams, "records": self.records, "packets": self.packets,
                "octets": self.octets, "options_records": self.options_records,
                "ignored_packets": self.ignored_packets, "slow_datagrams": self.slow_datagrams,
                "malformed": self.malformed}

    def _fast_sets(self, data: bytes, exporter: str) -> list[tuple[Any, int, int]] | None:
        """(dtype, start, end) per data set when every set is plain data of a known template, else None."""
        import struct

        if len(data) < 16:
            return None
        version, length, _, _, odid = struct.unpack_from("!HHIII", data)
        if version != 10 or length != len(data):
            return None
        sets = []
        off = 16
        while off + 4 <= length:
            set_id, set_len = struct.unpack_from("!HH", data, off)
            if set_len < 4 or off + set_len > length:
                return None
            dt = self._dtypes.get((exporter, odid, set_id))
            if set_id < 256 or dt is None:
                return None
            sets.append((dt, off + 4, off + set_len))
            off += set_len
        return sets if off == length else None

    def _learn(self, exporter: str, odid: int) -> None:
        import numpy as np

        for tid, tpl in self._decoder.templates(exporter, odid).items():
            key = (exporter, odid, tid)
            if tpl.is_options or any(f.variable for f in tpl.fields):
                self._dtypes.pop(key, None)
                continue
            names: list[str] = []
            formats: list[str] = []
            offsets: list[int] = []
            pos = 0
            for f in tpl.fields:
                if f.enterprise == 0 and f.length in (1, 2, 4, 8) and (
                        f.element_id in _PACKET_IES or f.element_id in _OCTET_IES):
                    name = "p" if f.element_id in _PACKET_IES else "o"
                    if name not in names:
                        names.append(name)
                        formats.append(f">u{f.length}")
                        offsets.append(pos)
                pos += f.length
            self._dtypes[key] = np.dtype({"names": names, "formats": formats, "offsets": offsets,
                                          "itemsize": pos})

    def add(self, data: bytes, exporter: str = "-") -> None:
        import numpy as np

        self.datagrams += 1
        sets = self._fast_sets(data, exporter)
        if sets is not None:
            for dt, start, end in sets:
                n = (end - start) // dt.itemsize
                if n <= 0:
                    continue
                arr = np.frombuffer(data, dtype=dt, count=n, offset=start)
                self.records += n
                if "p" in dt.names:
                    self.packets += int(arr["p"].sum(dtype=np.uint64))
                if "o" in dt.names:
                    self.octets += int(arr["o"].sum(dtype=np.uint64))
            return
        self.slow_datagrams += 1
        res = self._decoder.feed(data, exporter)
        self.malformed += len(res.malformed)
        for rec in res.records:
            if rec.is_options:
                self.options_records += 1
                if _IGNORED_PACKETS in rec.fields:
                    self.ignored[(rec.exporter, rec.odid)] = int(rec.fields[_IGNORED_PACKETS])  # type: ignore[arg-type]
                continue
            self.records += 1
            f = rec.fields
            self.packets += int(f.get("packetDeltaCount", f.get("packetTotalCount", 0)))  # type: ignore[arg-type]
            self.octets += int(f.get("octetDeltaCount", f.get("octetTotalCount", 0)))  # type: ignore[arg-type]
        if len(data) >= 16:
            import struct

            self._learn(exporter, struct.unpack_from("!I", data, 12)[0])


def sink_main(argv: Sequence[str] | None = None) -> int:
    """`python -m tools.sweep sink --port N`: hold every datagram, tally on SIGTERM, print one JSON line.

    Datagrams are only stored while traffic runs (a recv and an append each),
    so the collector's CPU in the measured window stays small; decoding
    happens after the stop signal.
    """
    import argparse
    import socket

    p = argparse.ArgumentParser(prog="python -m tools.sweep sink")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=COLLECTOR_PORT)
    p.add_argument("--rcvbuf", type=int, default=SINK_BUFFER)
    args = p.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (33, socket.SO_RCVBUF):   # SO_RCVBUFFORCE (needs CAP_NET_ADMIN), else what rmem_max allows
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, args.rcvbuf)
            break
        except OSError:
            continue
    sock.bind((args.host, args.port))
    sock.settimeout(0.2)
    stop = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print(json.dumps({"event": "listening", "rcvbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)}),
          flush=True)
    held: list[tuple[bytes, Any]] = []
    while not stop:
        try:
            held.append(sock.recvfrom(65535))
        except TimeoutError:
            continue
        except InterruptedError:
            continue
    sock.setblocking(False)
    while True:
        try:
            held.append(sock.recvfrom(65535))
        except (BlockingIOError, InterruptedError):
            break
    sock.close()
    tally = Tally()
    for data, addr in held:
        tally.add(data, f"{addr[0]}:{addr[1]}")
    print(json.dumps({"event": "summary", **tally.summary()}), flush=True)
    return 0


# ---------------------------------------------------------------- processes

class Child:
    """A process in its own session: signalled as a group, reaped here with wait4 for its CPU time.

    Output goes to a log file, never a pipe, so a chatty child cannot block on
    a full pipe while we sleep.
    """

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, cwd: Path | None = None,
                 death_signal: int = signal.SIGKILL) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")  # closed in close()
        try:
            self.proc = subprocess.Popen(with_death_signal(self.argv, death_signal), stdout=self._log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                         start_new_session=True)
        except BaseException:
            self._log.close()
            raise
        self.cpu_total: float | None = None   # user+sys at exit, children included (wait4)
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _reap(self, block: bool) -> bool:
        if self.returncode is not None:
            return True
        try:
            pid, status, ru = os.wait4(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            self.returncode = self.proc.returncode if self.proc.returncode is not None else -1
            return True
        if pid == 0:
            return False
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode  # so Popen never waits for it again
        self.cpu_total = ru.ru_utime + ru.ru_stime
        return True

    def alive(self) -> bool:
        return not self._reap(block=False)

    def cpu_now(self) -> float:
        """CPU seconds so far (live), or the total once reaped."""
        if self.cpu_total is not None:
            return self.cpu_total
        return process_cpu_seconds(self.pid)

    def memory_mb(self, key: str = "VmRSS") -> float:
        try:
            return parse_status_mb(Path(f"/proc/{self.pid}/status").read_text(encoding="ascii"), key)
        except OSError:
            return 0.0

    def signal_group(self, sig: int) -> None:
        """Signal the whole process group; only while the leader is unreaped (its pgid cannot be reused)."""
        if self.returncode is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._reap(block=False):
                return True
            time.sleep(0.05)
        return self._reap(block=False)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> bool:
        """Signal, wait; SIGKILL the group if it does not exit. True if it exited by itself."""
        if not self.alive():
            return True
        self.signal_group(sig)
        if self.wait(timeout):
            return True
        self.kill()
        return False

    def kill(self) -> None:
        if self.returncode is None:
            self.signal_group(signal.SIGKILL)
            self._reap(block=True)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        try:
            self.kill()
        finally:
            self._log.close()


def with_death_signal(argv: Sequence[str], sig: int) -> list[str]:
    """`argv` run so that it gets `sig` when this process dies (even by SIGKILL): nothing outlives a bench.

    setpriv (util-linux) sets PR_SET_PDEATHSIG, which survives its execve and `ip netns exec`'s; children
    the command forks itself (trafgen's worker) are stopped by that command's own handling of `sig`.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return list(argv)
    return [setpriv, "--pdeathsig", signal.Signals(sig).name, *argv]


def machine_cpu() -> CpuTimes:
    return parse_proc_stat(Path("/proc/stat").read_text(encoding="ascii"))


# ---------------------------------------------------------------- plan

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


# ---------------------------------------------------------------- one phase

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


# ---------------------------------------------------------------- derived figures (pure)

def derive(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Probe overhead against the same point's `none` phase (same rep), collector CPU taken out.

    overhead_cores: busy_ours (machine busy minus other jobs' processes) minus the baseline's;
    overhead_ns_per_packet: the same per packet, each phase divided by its own packet rate, so phases
    that reached different rates (at `max`) still compare; overhead_raw_cores: plain machine busy CPU.
    """
    base = {(r["sweep"], r["flows"], r["pps_target"], r["rep"]): r for r in rows if r["probe"] == "none"}
    for r in rows:
        b = base.get((r["sweep"], r["flows"], r["pps_target"], r["rep"]))
        if r["probe"] == "none" or b is None or "machine_busy_cores" not in r or "machine_busy_cores" not in b:
            continue
        collector = r.get("collector_cpu_cores", 0.0)
        r["overhead_raw_cores"] = round(r["machine_busy_cores"] - b["machine_busy_cores"] - collector, 4)
        key = "busy_ours_cores" if "busy_ours_cores" in r and "busy_ours_cores" in b else "machine_busy_cores"
        r["overhead_cores"] = round(r[key] - b[key] - collector, 4)
        if r.get("pps_sent") and b.get("pps_sent"):
            per_packet = (r[key] - collector) / r["pps_sent"] - b[key] / b["pps_sent"]
            r["overhead_ns_per_packet"] = round(per_packet * 1e9, 1)
        r["baseline_busy_cores"] = b["machine_busy_cores"]
        r["baseline_pps_sent"] = b.get("pps_sent")
    return rows


def _median(values: Sequence[Any]) -> Any:
    nums = [v for v in values if isinstance(v, int | float)]
    return statistics.median(nums) if nums else None


def pivot(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (sweep, flows, rate): each probe's figures side by side (medians over reps)."""
    keys: list[tuple[str, int, int]] = []
    groups: dict[tuple[str, int, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        k = (r["sweep"], r["flows"], r["pps_target"])
        if k not in keys:
            keys.append(k)
        groups.setdefault((*k, r["probe"]), []).append(r)
    cols = ("pps_sent", "machine_busy_cores", "probe_cpu_cores", "overhead_cores", "rss_mb", "peak_rss_mb",
            "accounted_ratio", "collector_records", "collector_socket_drops", "probe_dropped_packets",
            "kernel_map_mb", "packets_sent", "accounted_packets", "ignored_packets", "overhead_ns_per_packet",
            "machine_idle_cores", "overhead_raw_cores", "others_cpu_cores", "busy_ours_cores")
    out = []
    for sweep, flows, pps in keys:
        line: dict[str, Any] = {"sweep": sweep, "flows": flows, "pps_target": pps}
        for probe in PROBES:
            rs = groups.get((sweep, flows, pps, probe), [])
            for c in cols:
                if any(c in r for r in rs):
                    line[f"{probe}_{c}"] = _median([r.get(c) for r in rs])
        idle = [v for k, v in line.items() if k.endswith("_machine_idle_cores") and isinstance(v, int | float)]
        if idle:
            line["min_idle_cores"] = min(idle)
        x, s = line.get("xdpflow_probe_cpu_cores"), line.get("softflowd_probe_cpu_cores")
        if isinstance(x, float | int) and isinstance(s, float | int) and x > 0:
            line["cpu_ratio"] = s / x
        x, s = line.get("xdpflow_overhead_cores"), line.get("softflowd_overhead_cores")
        if isinstance(x, float | int) and isinstance(s, float | int) and x > 0:
            line["overhead_ratio"] = s / x
        out.append(line)
    return out


def idle_noise(seconds: float = 3.0) -> float:
    """Busy cores of the machine with none of our traffic (other jobs, this process's own polling)."""
    a = machine_cpu()
    t0 = time.monotonic()
    time.sleep(seconds)
    d = machine_cpu() - a
    return round(d.busy / (time.monotonic() - t0), 4)


def run_sweep(opts: SweepOptions, workdir: Path, logdir: Path,
              progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The whole sweep on one veth pair; namespaces and children gone on return, whatever happened."""
    from tools.netns import VethPair

    logdir.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    with VethPair() as pair:
        sweep = Sweep(opts, workdir, logdir, pair.gen, pair.obs, pair.gen_if, pair.obs_if, progress)
        return sweep.run(plan(opts))


def xdp_empty_main(argv: Sequence[str]) -> int:
    """`python -m tools.sweep xdp-empty IFNAME [native|generic]`: an XDP_PASS-only program until SIGTERM.

    The control probe: what native XDP on this interface costs before any metering (on veth, XDP moves
    the receive path to NAPI and copies frames that lack XDP headroom).
    """
    import socket

    from bcc import BPF

    from exporter import logs
    from xdp import bpfsys
    from xdp.headers import find

    logs.configure("warning")
    ifname, mode = (argv[0], argv[1] if len(argv) > 1 else "native")
    flags = 1 << 1 if mode == "generic" else 1 << 2   # XDP_FLAGS_SKB_MODE / XDP_FLAGS_DRV_MODE
    found = find()
    with found.applied():
        prog = BPF(text=EMPTY_XDP.encode(), cflags=["-w", *found.cflags])
    link = -1
    try:
        fd = prog.load_func(b"empty", BPF.XDP).fd
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        link = bpfsys.xdp_link_create(fd, socket.if_nametoindex(ifname), flags)
        print(json.dumps({"event": "attached", "interface": ifname, "mode": mode}), flush=True)
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
    finally:
        if link >= 0:
            os.close(link)   # closing the bpf_link detaches the program
        prog.cleanup()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["sink"]:
        sys.exit(sink_main(sys.argv[2:]))
    if sys.argv[1:2] == ["xdp-empty"]:
        sys.exit(xdp_empty_main(sys.argv[2:]))
    print("usage: python -m tools.sweep sink [--port N] | xdp-empty IFNAME  (the sweep: xdpflow bench sweep)",
          file=sys.stderr)
    sys.exit(2)
