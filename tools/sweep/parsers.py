"""What the sweep reads: /proc text, trafgen's and softflowctl's summaries (pure parsers), and the
few readers of the live /proc built on them.

CPU comes from two places. The machine's busy time is the aggregate `cpu` line of /proc/stat
(softirq included, where the kernel does a packet's work). A process's own time is the sum of
its threads' schedstat run time (nanoseconds), falling back to utime+stime in clock ticks where
schedstat is missing. Other jobs share the machine, so others_cpu_seconds adds up every
user-space process outside the sweep's sessions, to be taken out of the machine's figure.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def machine_cpu() -> CpuTimes:
    return parse_proc_stat(Path("/proc/stat").read_text(encoding="ascii"))


def idle_noise(seconds: float = 3.0) -> float:
    """Busy cores of the machine with none of our traffic (other jobs, this process's own polling)."""
    a = machine_cpu()
    t0 = time.monotonic()
    time.sleep(seconds)
    d = machine_cpu() - a
    return round(d.busy / (time.monotonic() - t0), 4)


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
