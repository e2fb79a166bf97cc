"""Benchmarks: `xdpflow bench kernel|pipeline|sweep|all` (timing lives here, never in pass/fail tests).

`kernel`: BPF_PROG_TEST_RUN on the real XDP program, ns/packet beside an empty
program loaded in the same run: established IPv4 TCP, IPv6, VLAN flows (min and
median over rounds of `repeat` packets), then new flows one run each into an
empty and into a full table (LRU eviction), with a hit measured the same way
(one run per packet) as the like-for-like reference.

`pipeline`: the user-space path alone at N flows, each N in a fresh process
(so peak RSS is that N's). A flow page is filled with N synthetic entries
through BPF_MAP_UPDATE_BATCH (real kernel map, real batch drain), the table is
primed with the same flows, then one scan is timed stage by stage: drain (flip
excluded: it is an RCU wait, not CPU), merge, flow table, IPFIX encode, UDP
send to a loopback sink. Every flow is known and every flow is exported
(active timeout reached): the steady state of a busy exporter. Best of
`rounds` scans; records/s per stage and in total, CPU time, peak RSS.

`sweep`: real traffic through a veth pair into xdpflow and softflowd, see
tools/sweep/.

`all`: the three in a row. `--short` runs fewer points and shorter windows
(under 10 minutes together); each command writes CSV + JSON results, PNG
plots and summary.md (built from every result file present) to --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tools.plots import PIPELINE_STAGES
from tools.sweep import (
    EMPTY_XDP,
    PROBES,
    RATE_SWEEP_FLOWS,
    SweepOptions,
    Timers,
    flow_grid,
    human_count,
    parse_pid_stat,
    pivot,
    profile_flows,
    rate_label,
    trafgen_profile,
)

if TYPE_CHECKING:
    import numpy as np

T = TypeVar("T")
DEFAULT_OUT = Path("out/bench")
__all__ = ["flow_grid", "proc_cpu_seconds", "trafgen_profile"]  # kept importable from here

# Targets of shared/DESIGN.md section 5.
KERNEL_HIT_NS = 25
KERNEL_HIT_ABOVE_EMPTY_NS = 40
KERNEL_NEW_NS = 350
PIPELINE_RPS = 2_000_000
PIPELINE_SCAN_FLOWS = 500_000
PIPELINE_SCAN_CPU_S = 0.25
CPU_RATIO = 20
OVERHEAD_RATIO = 10
RSS_FLOWS = 1_000_000
RSS_MB = 150


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return parse_pid_stat(f.read())


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- pipeline

# The stages of one scan's user path, as the service runs them (tools.plots.PIPELINE_STAGES): fold
# the drained page's slots into the flow table (read where they lie: drain, per-CPU merge and table
# join in one pass), expire, encode IPFIX, send.


@dataclass
class StageTimes:
    flows: int
    slots: int
    fold_s: float
    expire_s: float
    encode_s: float
    send_s: float
    datagrams: int
    cpu_s: float
    peak_rss_mb: float

    @property
    def total_s(self) -> float:
        return self.fold_s + self.expire_s + self.encode_s + self.send_s

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_s"] = self.total_s
        d["records_per_s"] = self.flows / self.total_s if self.total_s else 0.0
        for stage in PIPELINE_STAGES:
            t = d[f"{stage}_s"]
            d[f"{stage}_rps"] = self.flows / t if t else float("inf")
        return d


def synthetic_slots(n: int, cpus: int, now_jiffies: int, seed: int = 1) -> np.ndarray:
    """The slots a page holds for n flows: one per CPU that saw a flow, in random order.

    As the seed's per-CPU values: the first CPU always saw the flow, every other one 99 times in
    100, so nearly every flow has a slot on every CPU (the costly case; with RSS a flow usually
    stays on one CPU and takes one slot).
    """
    import numpy as np

    from xdp.layout import FLOW_KEY, FLOW_SLOT

    rng = np.random.default_rng(seed)
    keys = np.zeros(n, dtype=FLOW_KEY)
    v6 = rng.random(n) < 0.2
    keys["ip_version"] = np.where(v6, 6, 4)
    keys["src_addr"][:, 10:12] = np.where(v6[:, None], 0, 0xFF)
    keys["dst_addr"][:, 10:12] = np.where(v6[:, None], 0, 0xFF)
    keys["src_addr"][:, 12:16] = rng.integers(0, 256, (n, 4), dtype=np.uint8)
    keys["dst_addr"][:, 12:16] = np.frombuffer(np.arange(n, dtype=">u4").tobytes(), dtype=np.uint8).reshape(n, 4)
    keys["src_addr"][v6, 0] = 0xFD
    keys["dst_addr"][v6, 0] = 0xFD
    keys["protocol"] = rng.choice(np.array([6, 17, 1], dtype=np.uint8), n)
    keys["src_port"] = rng.integers(1024, 65535, n, dtype=np.uint16)
    keys["dst_port"] = rng.integers(1, 1024, n, dtype=np.uint16)
    keys["ifindex"] = 2
    packets = rng.integers(0, 100, (n, cpus), dtype=np.uint64)
    packets[:, 0] += 1
    flow, _ = np.nonzero(packets)
    slots = np.zeros(len(flow), dtype=FLOW_SLOT)
    slots["key"] = keys[flow]
    v = slots["value"]
    v["packets"] = packets[packets > 0]
    v["octets"] = v["packets"] * np.uint64(500)
    v["first_seen"] = np.uint64(now_jiffies - 1250)   # 5 s before, at 250 Hz
    v["last_seen"] = np.uint64(now_jiffies)
    v["min_ttl"] = 60
    v["max_ttl"] = 64
    return slots[rng.permutation(len(slots))]


def write_page(dp: Any, page: int, slots: np.ndarray) -> None:
    """Put `slots` into idle `page` of a loaded datapath as its programs would have: the slot array
    (through a writable mapping) and the page's slot count."""
    import mmap

    import numpy as np

    from xdp import bpfsys
    from xdp.layout import FLOW_SLOT, SLOT_ALLOC

    size = FLOW_SLOT.itemsize
    start = page * dp.max_entries * size
    offset = start - start % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(dp.slots_fd, start + len(slots) * size - offset, mmap.MAP_SHARED,
                   mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    try:
        mm[start - offset:start - offset + len(slots) * size] = slots.tobytes()
    finally:
        mm.close()
    alloc = np.zeros(1, dtype=SLOT_ALLOC)
    alloc["next"] = len(slots)
    import ctypes

    bpfsys.map_update(dp.slot_alloc_fd, ctypes.c_uint32(page), alloc)


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_pipeline(n: int, rounds: int = 3) -> list[StageTimes]:
    """`rounds` timed scans of n flows, each into a table primed with the same flows (in this process)."""
    import time as _time

    from exporter.core import CoreTable
    from exporter.drain import Pages
    from exporter.ipfix.encoder import Encoder
    from exporter.merge import clock_offset_ns
    from exporter.transport import send_datagrams
    from xdp.loader import Datapath

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.connect(sink.getsockname())
    out.setblocking(False)
    results = []
    try:
        with Datapath(max_entries=n * 2 + 1024, memory_budget=16 << 30).load() as dp:
            pages = Pages(dp)
            slots = synthetic_slots(n, dp.cpus, dp.read_clock().jiffies)
            table = CoreTable(active_timeout_s=60, idle_timeout_s=15)
            enc = Encoder(odid=1, mtu=1400)

            def fill_and_flip() -> Any:
                write_page(dp, pages.active, slots)  # as if the programs had written the active page
                return pages.flip()

            for _ in range(rounds):
                offset = clock_offset_ns()
                # Prime the table with the same flows (steady state), then time one full scan.
                d = fill_and_flip()
                table.fold_page(d, offset)
                d.release()
                now_ms = (_time.monotonic_ns() + offset) // 1_000_000
                d = fill_and_flip()
                cpu0 = _time.process_time()
                (folded, _, _), t_fold = _timed(lambda: table.fold_page(d, offset))  # noqa: B023
                d.release()
                assert folded == len(slots), f"folded {folded} of {len(slots)} slots"
                # As the service does: the expiry streamed a chunk at a time, each encoded and sent.
                chunks = table.expire_chunks(now_ms + 61_000)
                t_expire = t_enc = t_send = 0.0
                expired = datagrams = 0
                while True:
                    chunk, t = _timed(lambda: next(chunks, None))  # noqa: B023
                    t_expire += t
                    if chunk is None:
                        break
                    expired += len(chunk)
                    dgrams, t = _timed(lambda: enc.encode(chunk, _time.time()))  # noqa: B023
                    t_enc += t
                    _, t = _timed(lambda: send_datagrams(out, dgrams))  # noqa: B023
                    t_send += t
                    datagrams += len(dgrams)
                assert expired == n, f"expired {expired} of {n}"
                cpu = _time.process_time() - cpu0
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                results.append(StageTimes(n, len(slots), t_fold, t_expire, t_enc, t_send, datagrams, cpu, rss))
    finally:
        sink.close()
        out.close()
    return results


def pipeline_row(runs: Sequence[StageTimes]) -> dict[str, Any]:
    """The best (least total time) scan, with the median total beside it."""
    best = min(runs, key=lambda r: r.total_s)
    row = best.row()
    totals = sorted(r.total_s for r in runs)
    row["rounds"] = len(runs)
    row["total_s_median"] = totals[len(totals) // 2]
    row["records_per_s_median"] = best.flows / row["total_s_median"] if row["total_s_median"] else 0.0
    row["peak_rss_mb"] = max(r.peak_rss_mb for r in runs)
    return row


def pipeline_isolated(n: int, rounds: int) -> dict[str, Any]:
    """One N in a fresh interpreter, so its peak RSS is its own."""
    res = subprocess.run([sys.executable, "-m", "tools.bench", "pipeline", "--flows", str(n), "--rounds",
                          str(rounds), "--in-process"], capture_output=True, text=True, check=False, timeout=1800,
                         cwd=Path(__file__).resolve().parents[1])
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"pipeline bench at {n} flows failed ({res.returncode}): {res.stderr.strip()[-600:]}")
    row: dict[str, Any] = json.loads(lines[-1])
    return row


# ---------------------------------------------------------------- kernel

def _kernel_frames() -> dict[str, bytes]:
    from tools.packets import TCP, UDP, Flow

    return {
        "ipv4_tcp": Flow("t", "198.18.0.1", "198.19.0.1", TCP, 40000, 443, tcp_flags=0x10, payload_len=0).frame(),
        "ipv6_udp": Flow("u", "fd00::1", "fd00::2", UDP, 5000, 53, payload_len=32).frame(),
        "vlan_ipv4_udp": Flow("v", "198.18.0.1", "198.19.0.1", UDP, 1, 2, vlan=42, payload_len=32).frame(),
    }


def _tunnelled(kind: str, inner: bytes) -> bytes:
    """`inner` (an Ethernet frame) in VXLAN (VNI 4242) or GRE with key 7 (its IP packet), over IPv4."""
    import struct

    if kind == "vxlan":
        l4 = struct.pack("!HHHH", 50000, 4789, 16 + len(inner), 0) + struct.pack("!B3xI", 0x08, 4242 << 8) + inner
        proto = 17
    else:
        l4 = struct.pack("!BBHI", 0x20, 0, 0x0800, 7) + inner[14:]
        proto = 47
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, bytes([198, 18, 0, 1]),
                     bytes([198, 18, 0, 2]))
    return inner[:12] + b"\x08\x00" + ip + l4


def _varied(frame: bytes, i: int) -> bytes:
    """The same IPv4 frame with source port i (offset 34): a new flow per i."""
    return frame[:34] + (i & 0xFFFF).to_bytes(2, "big") + frame[36:38] + (i >> 16 & 0xFFFF).to_bytes(2, "big") \
        + frame[40:]


# Filter rule sets for the kernel benchmark: 10 rules on every dimension, and 1000 CIDRs (LPM tries).
FILTER_CASES = {
    "10_rules": [f"exclude dst 10.{i}.0.0/16" for i in range(4)] + [
        "exclude src 2001:db8::/32", "exclude proto udp dport 53", "exclude vlan 99", "exclude sport 1-1023",
        "exclude net 172.16.0.0/12", "exclude proto icmp"],
    "1000_cidrs": [",".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(600)).join(("exclude dst ", "")),
                   ",".join(f"2001:db8:{i:x}::/48" for i in range(300)).join(("exclude src ", "")),
                   ",".join(f"192.0.2.{i}" for i in range(1, 101)).join(("exclude dst ", " dport 443"))],
}


def bench_kernel(repeat: int = 1_000_000, rounds: int = 5, new_flows: int = 20_000) -> dict[str, Any]:
    """ns/packet from BPF_PROG_TEST_RUN: min and median over `rounds` runs of `repeat` packets."""
    from bcc import BPF

    from exporter.drain import Pages
    from xdp import bpfsys, filters
    from xdp.headers import find
    from xdp.loader import Datapath

    found = find()
    with found.applied():
        empty = BPF(text=EMPTY_XDP.encode(), cflags=["-w", *found.cflags])
    out: dict[str, Any] = {"repeat": repeat, "rounds": rounds, "new_flows": new_flows}
    try:
        empty_fd = empty.load_func(b"empty", BPF.XDP).fd

        def series(fd: int, frame: bytes) -> dict[str, float]:
            # Each round next to a round of the empty program: a shared VM's noise moves both alike,
            # so the paired difference is the steadier figure of what the program adds.
            ns, above = [], []
            for _ in range(rounds):
                e = bpfsys.prog_test_run(empty_fd, frames["ipv4_tcp"], repeat=repeat).duration_ns
                t = bpfsys.prog_test_run(fd, frame, repeat=repeat).duration_ns
                ns.append(t)
                above.append(t - e)
            ns.sort()
            above.sort()
            return {"min_ns": ns[0], "median_ns": ns[len(ns) // 2], "above_empty_median_ns": above[len(above) // 2]}

        frames = _kernel_frames()
        out["empty_program"] = series(empty_fd, frames["ipv4_tcp"])

        def paired_new(fd: int, start: int) -> tuple[float, float]:
            """New flows one run each, each followed by a run of the flow created 10,000 new flows
            earlier (held by the flow map, long gone from the per-CPU cache: a cold hit). (median
            new-flow run, median of new minus that cold hit)."""
            news: list[int] = []
            diffs: list[int] = []
            for i in range(new_flows):
                t_new = bpfsys.prog_test_run(fd, _varied(frames["ipv4_tcp"], start + i)).duration_ns
                news.append(t_new)
                if i >= 10_000:
                    diffs.append(t_new - bpfsys.prog_test_run(fd, _varied(frames["ipv4_tcp"],
                                                                          start + i - 10_000)).duration_ns)
            news.sort()
            diffs.sort()
            return float(news[len(news) // 2]), float(diffs[len(diffs) // 2])

        table = new_flows * 4
        with Datapath(max_entries=table + table // 8 + 1024).load() as dp:
            for name, frame in frames.items():
                out[f"hit_{name}"] = series(dp.prog_fd, frame)
            # The hit path behind filter rules that all have to be looked at (none matches the frame).
            for name, rules in FILTER_CASES.items():
                dp.configure(filters.compile_rules(filters.parse_rules(rules)), 1)
                out[f"hit_ipv4_tcp_{name}"] = series(dp.prog_fd, frames["ipv4_tcp"])
            dp.configure(None, 4)
            out["hit_ipv4_tcp_sampling_1_in_4"] = series(dp.prog_fd, frames["ipv4_tcp"])
            dp.configure(None, 1)

            def one_each(start: int) -> float:
                runs = [bpfsys.prog_test_run(dp.prog_fd, _varied(frames["ipv4_tcp"], start + i)).duration_ns
                        for i in range(new_flows)]
                runs.sort()
                return float(runs[len(runs) // 2])

            pages = Pages(dp)
            pages.flip_and_merge(0)
            # One run per packet too, so the slower paths have a like-for-like reference: the same flow
            # (the cache hit), and new_flows flows in turn, many more than the per-CPU cache holds
            # (so nearly every packet misses it and finds its slot through the LRU flow map).
            runs = sorted(bpfsys.prog_test_run(dp.prog_fd, frames["ipv4_tcp"]).duration_ns for _ in range(new_flows))
            out["hit_single_run_median_ns"] = float(runs[len(runs) // 2])
            one_each(1)
            out["lru_hit_single_run_median_ns"] = one_each(1)
            pages.flip_and_merge(0)
            out["new_flow_empty_table_median_ns"], out["new_flow_empty_table_over_cold_hit_ns"] = \
                paired_new(dp.prog_fd, 100_000)
            pages.flip_and_merge(0)
            # The same flows again after the flip: known to the flow map, each takes a slot of the new
            # page (a scan's cost of a flow that goes on; before the slot array, a new flow each scan).
            out["known_flow_new_page_median_ns"], out["known_flow_new_page_over_cold_hit_ns"] = \
                paired_new(dp.prog_fd, 100_000)
            pages.flip_and_merge(0)
        with Datapath(max_entries=new_flows).load() as dp:
            pages = Pages(dp)
            for i in range(3):  # fill the flow map well past capacity, freeing the page's slots each round
                for j in range(new_flows):
                    bpfsys.prog_test_run(dp.prog_fd, _varied(frames["ipv4_tcp"], 1_000_000 + i * new_flows + j))
                pages.flip_and_merge(0)
            out["new_flow_full_table_median_ns"], out["new_flow_full_table_over_cold_hit_ns"] = \
                paired_new(dp.prog_fd, 5_000_000)
            out["full_table_stats"] = dp.read_stats()
        # Extensions (issue 14): tunnel packets through the default program (metered as their outer
        # flow), then plain and tunnel packets through the program with the feature compiled in.
        tunnel_frames = {"vxlan_ipv4_tcp": _tunnelled("vxlan", frames["ipv4_tcp"]),
                         "gre_key_ipv4_tcp": _tunnelled("gre", frames["ipv4_tcp"])}
        with Datapath(max_entries=new_flows).load() as dp:
            for name, frame in tunnel_frames.items():
                out[f"hit_{name}"] = series(dp.prog_fd, frame)
        with Datapath(max_entries=new_flows, features=("tunnels",)).load() as dp:
            for name, frame in {**frames, **tunnel_frames}.items():
                out[f"tunnels_hit_{name}"] = series(dp.prog_fd, frame)
    finally:
        empty.cleanup()
    return with_kernel_estimates(out)


def with_kernel_estimates(k: dict[str, Any]) -> dict[str, Any]:
    """A one-packet run carries the test run's fixed cost; the new-flow cost per packet is estimated as
    (new-flow run - the cold hit run next to it) + (hit per packet in a batch): as the seed's method
    (new-flow single run - single-run hit of flows in turn + batch hit), paired to cancel noise."""
    hit = k.get("hit_ipv4_tcp", {}).get("median_ns")
    single = k.get("hit_single_run_median_ns")
    for table in ("empty", "full"):
        new = k.get(f"new_flow_{table}_table_median_ns")
        over = k.get(f"new_flow_{table}_table_over_cold_hit_ns")
        if hit is not None and over is not None:
            k[f"new_flow_{table}_table_est_ns"] = round(over + hit, 1)
        elif hit is not None and single is not None and new is not None:
            k[f"new_flow_{table}_table_est_ns"] = round(new - single + hit, 1)
    over = k.get("known_flow_new_page_over_cold_hit_ns")
    if hit is not None and over is not None:
        k["known_flow_new_page_est_ns"] = round(over + hit, 1)
    lru = k.get("lru_hit_single_run_median_ns")
    if hit is not None and single is not None and lru is not None:
        k["lru_hit_est_ns"] = round(lru - single + hit, 1)
    return k


def kernel_rows(k: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, v in k.items():
        if isinstance(v, dict) and "median_ns" in v:
            rows.append({"case": name, "min_ns": v["min_ns"], "median_ns": v["median_ns"],
                         "above_empty_ns": v.get("above_empty_median_ns", "")})
        elif name.endswith("_ns"):
            rows.append({"case": name.removesuffix("_ns"), "min_ns": "", "median_ns": v, "above_empty_ns": ""})
    return rows


# ---------------------------------------------------------------- one exporter point (kept from the seed)

def bench_exporter(flows: int, pps: int, seconds: float, scan_interval: float = 10.0) -> dict[str, Any]:
    """Real traffic through a veth pair into `xdpflow run`; the exporter process's CPU over `seconds`."""
    import tempfile

    from tools.netns import VethPair
    from tools.sweep import Point, Sweep

    opts = SweepOptions(measure=seconds, timers=Timers(scan_interval, max(60.0, scan_interval),
                                                       max(15.0, scan_interval)))
    with VethPair() as pair, tempfile.TemporaryDirectory(prefix="xdpflow-bench-") as tmp:
        sweep = Sweep(opts, Path(tmp), Path(tmp), pair.gen, pair.obs, pair.gen_if, pair.obs_if)
        row = sweep.run_phase(Point("exporter", flows, pps), "xdpflow")
    row["cpu_share"] = row.get("probe_cpu_cores")
    return row


# ---------------------------------------------------------------- results on disk

def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows as CSV with the union of their keys (first-seen order); missing cells empty."""
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="", extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(v) for k, v in r.items()})


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict | list):
        return json.dumps(v, separators=(",", ":"))
    return v


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _run(cmd: Sequence[str]) -> str:
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (res.stdout + res.stderr).strip()


def machine_info(noise_seconds: float = 3.0) -> dict[str, Any]:
    """What the numbers came from, and how busy the machine was without our traffic."""
    from tools.sweep import idle_noise

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    m = re.search(r"softflowd version (\d+(?:\.\d+)*)", _run(["softflowd", "-h"]))
    softflowd = f"softflowd {m.group(1)}" if m else ""
    top = _run(["ps", "-eo", "pcpu,etimes,comm", "--sort=-pcpu"]).splitlines()[1:7]
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "memory_gib": round(mem_kb / (1 << 20), 1),
        "python": platform.python_version(),
        "trafgen": _run(["trafgen", "-v"]).splitlines()[0] if _run(["trafgen", "-v"]) else "",
        "softflowd": softflowd,
        "loadavg": Path("/proc/loadavg").read_text(encoding="ascii").split()[:3],
        "idle_busy_cores": idle_noise(noise_seconds),
        "top_processes": [" ".join(t.split()) for t in top],
    }


# ---------------------------------------------------------------- summary

def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None or v == "":
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _pct(v: Any) -> str:
    x = _num(v)
    return "-" if x is None else f"{x * 100:.2f}%"


def _cores(v: Any) -> str:
    x = _num(v)
    return "-" if x is None else f"{x:.3f}"


def _find_line(lines: Sequence[dict[str, Any]], flows: int, pps: int) -> dict[str, Any] | None:
    for ln in lines:
        if ln["flows"] == profile_flows(flows) and ln["pps_target"] == pps:
            return ln
    return None


def targets(kernel: dict[str, Any] | None, pipeline: Sequence[dict[str, Any]] | None,
            sweep: Sequence[dict[str, Any]] | None) -> list[list[str]]:
    """[target, goal, measured, verdict] for each target of DESIGN.md section 5 that has data."""
    out: list[list[str]] = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "MISSED")

    if kernel:
        hit = kernel.get("hit_ipv4_tcp", {}).get("median_ns")
        empty = kernel.get("empty_program", {}).get("median_ns")
        above = kernel.get("hit_ipv4_tcp", {}).get("above_empty_median_ns")
        if hit is not None and above is not None:
            out.append(["Kernel hit path above the empty program, IPv4 TCP established (PROG_TEST_RUN)",
                        f"<= {KERNEL_HIT_ABOVE_EMPTY_NS} ns/packet ({KERNEL_HIT_NS} aimed for)",
                        f"{above} ns (median of rounds paired with the empty program); hit {hit} ns, empty "
                        f"{empty} ns median", verdict(above <= KERNEL_HIT_ABOVE_EMPTY_NS)])
        elif hit is not None:
            out.append(["Kernel hit path, IPv4 TCP established (PROG_TEST_RUN)", f"<= {KERNEL_HIT_NS} ns/packet",
                        f"{hit} ns median; empty program {empty} ns in the same run, so {hit - (empty or 0)} ns "
                        f"above it ({hit / empty:.1f}x)" if empty else f"{hit} ns median",
                        verdict(hit <= KERNEL_HIT_NS)])
        for table in ("empty", "full"):
            est = kernel.get(f"new_flow_{table}_table_est_ns")
            if est is not None:
                raw = kernel.get(f"new_flow_{table}_table_median_ns")
                over = kernel.get(f"new_flow_{table}_table_over_cold_hit_ns")
                how = (f"{over:.0f} ns over the cold hit run next to it + batch hit; single run {raw:.0f} ns"
                       if over is not None else f"{raw:.0f} ns single run - "
                       f"{kernel.get('hit_single_run_median_ns'):.0f} single-run hit + batch hit")
                out.append([f"New flow, {table} table", f"<= {KERNEL_NEW_NS} ns", f"{est:.0f} ns est. ({how})",
                            verdict(est <= KERNEL_NEW_NS)])
    if pipeline:
        rows = sorted(pipeline, key=lambda r: abs(r["flows"] - PIPELINE_SCAN_FLOWS))
        r = rows[0]
        out.append([f"Pipeline, drain..send, one core, {human_count(r['flows'])} flows",
                    f">= {PIPELINE_RPS / 1e6:g}M records/s", f"{r['records_per_s'] / 1e6:.2f}M records/s "
                    f"(best of {r.get('rounds', 1)}; median {r.get('records_per_s_median', 0) / 1e6:.2f}M)",
                    verdict(r["records_per_s"] >= PIPELINE_RPS)])
        if r["flows"] == PIPELINE_SCAN_FLOWS:
            out.append(["CPU per 500K-flow scan", f"<= {PIPELINE_SCAN_CPU_S} s", f"{r['cpu_s']:.3f} s",
                        verdict(r["cpu_s"] <= PIPELINE_SCAN_CPU_S)])
    if sweep:
        lines = pivot([r for r in sweep if "error" not in r])
        low = _find_line(lines, RATE_SWEEP_FLOWS, 10_000)
        top = _find_line(lines, RATE_SWEEP_FLOWS, 0)
        if low and top and _num(low.get("xdpflow_probe_cpu_cores")) is not None \
                and _num(top.get("xdpflow_probe_cpu_cores")) is not None:
            a, b = float(low["xdpflow_probe_cpu_cores"]), float(top["xdpflow_probe_cpu_cores"])
            same = abs(b - a) <= max(0.01, 0.5 * a)
            out.append(["Exporter CPU at 1K flows: 10 Kpps vs max", "the same (within 0.01 core or 50%)",
                        f"{a:.4f} vs {b:.4f} cores at {low.get('xdpflow_pps_sent', 0) / 1e3:.0f}K and "
                        f"{top.get('xdpflow_pps_sent', 0) / 1e3:.0f}K pps", verdict(same)])
        if top:
            x, s = _num(top.get("xdpflow_probe_cpu_cores")), _num(top.get("softflowd_probe_cpu_cores"))
            if x is not None and s is not None:
                floor = 1e-4   # below this the exporter is idle-polling; a ratio against ~0 means nothing
                ratio = s / max(x, floor)
                bound = "at least " if x < floor else ""
                out.append(["Process CPU vs softflowd at max rate (1K flows)", f"<= 1/{CPU_RATIO} of softflowd's",
                            f"xdpflow {x:.4f}, softflowd {s:.3f} cores at "
                            f"{(_num(top.get('softflowd_pps_sent')) or 0) / 1e3:.0f}K pps: {bound}1/{ratio:.0f}",
                            verdict(ratio >= CPU_RATIO)])
            x, s = _num(top.get("xdpflow_overhead_ns_per_packet")), _num(top.get("softflowd_overhead_ns_per_packet"))
            if x is not None and s is not None:
                e = _num(top.get("xdp_empty_overhead_ns_per_packet"))
                control = (f"; an empty XDP program alone {e:+.0f} ns, so xdpflow's metering adds {x - e:+.0f} ns "
                           "over the XDP hook itself") if e is not None else ""
                pps = ", ".join(f"{p.replace('_', ' ')} {(_num(top.get(f'{p}_pps_sent')) or 0) / 1e3:.0f}K"
                                for p in PROBES if f"{p}_pps_sent" in top)
                text = (f"per packet, beyond the no-probe run: xdpflow {x:+.0f} ns, softflowd {s:+.0f} ns"
                        f"{control} (pps {pps}; busy CPU minus other jobs' processes)")
                ok = s > 0 and (x <= 0 or s / x >= OVERHEAD_RATIO)
                idle = _num(top.get("min_idle_cores"))
                saturated = idle is not None and idle < 0.05
                if saturated:
                    text += f"; the machine was saturated in a phase (idle {idle:.2f} cores)"
                out.append(["Probe overhead vs softflowd at max rate", f"<= 1/{OVERHEAD_RATIO} of softflowd's",
                            text + (f": 1/{s / x:.1f}" if x > 0 and s > 0 else ""),
                            "inconclusive" if saturated else verdict(ok)])
        big = [r for r in sweep if r.get("probe") == "xdpflow" and r["flows"] >= profile_flows(RSS_FLOWS)
               and "peak_rss_mb" in r]
        if big:
            r = max(big, key=lambda r: r["peak_rss_mb"])
            out.append([f"Exporter RSS at {human_count(RSS_FLOWS)} flows", f"<= {RSS_MB} MB",
                        f"{r['rss_mb']:.0f} MB at the window's end, peak {r['peak_rss_mb']:.0f} MB; kernel maps "
                        f"{r.get('kernel_map_mb', 0):.0f} MiB ({r.get('max_entries', 0):,} entries)",
                        verdict(r["peak_rss_mb"] <= RSS_MB)])
    return out


def summary_markdown(out_dir: Path) -> str:
    machine = _read_json(out_dir / "machine.json") or {}
    kernel = _read_json(out_dir / "kernel.json")
    pipeline = _read_json(out_dir / "pipeline.json")
    sweep = _load_sweep(out_dir)
    sweep_meta = _read_json(out_dir / "sweep_meta.json") or {}
    parts = [f"# xdpflow benchmarks ({machine.get('date_utc', '?')} UTC)", ""]
    if machine:
        parts += [
            f"Machine: {machine.get('nproc')} vCPU {machine.get('cpu_model')}, kernel {machine.get('kernel')}, "
            f"{machine.get('memory_gib')} GiB, Python {machine.get('python')}; {machine.get('trafgen')}; "
            f"{machine.get('softflowd')}.",
            f"Noise: {machine.get('idle_busy_cores')} cores busy before the run without our traffic "
            f"(load average {' '.join(machine.get('loadavg', []))}); top processes: "
            + "; ".join(f"`{t}`" for t in machine.get("top_processes", [])) + ".", ""]
    tlines = targets(kernel, pipeline, sweep)
    if tlines:
        parts += ["## Targets (DESIGN.md section 5)", "", md_table(["target", "goal", "measured", "verdict"], tlines),
                  ""]
    if kernel:
        parts += ["## Kernel: BPF_PROG_TEST_RUN, ns/packet", "",
                  f"{kernel.get('rounds')} rounds of {kernel.get('repeat'):,} packets per batch case; "
                  f"{kernel.get('new_flows'):,} single-packet runs per new-flow case (medians).", "",
                  md_table(["case", "min ns", "median ns", "above empty (paired) ns"],
                           [[r["case"], r["min_ns"], r["median_ns"], r.get("above_empty_ns", "")]
                            for r in kernel_rows(kernel)]), ""]
    if pipeline:
        parts += ["## Pipeline: one scan, user space only (best of rounds)", "",
                  md_table(["flows", "slots", "total rec/s", *PIPELINE_STAGES, "scan CPU s", "datagrams",
                            "peak RSS MB"],
                           [[r["flows"], r.get("slots", ""), r["records_per_s"],
                             *(r.get(f"{stage}_rps", "") for stage in PIPELINE_STAGES), r["cpu_s"], r["datagrams"],
                             r["peak_rss_mb"]] for r in pipeline]), ""]
    if sweep:
        ok = [r for r in sweep if "error" not in r]
        lines = pivot(ok)
        t = sweep_meta.get("timers", {})
        parts += ["## Sweep: real traffic through a veth pair", "",
                  f"trafgen on one CPU, 60-byte UDP frames; probes: xdpflow (native XDP) and "
                  f"{machine.get('softflowd') or 'softflowd'} (libpcap), both exporting IPFIX to the same collector; "
                  f"timers for both: scan/expiry check every {t.get('scan_interval')} s, active "
                  f"{t.get('active_timeout')} s, idle {t.get('idle_timeout')} s. Window {sweep_meta.get('measure')} s "
                  "after a warm-up. CPU in cores (1.0 = one CPU busy). Overhead = machine busy CPU (/proc/stat, "
                  "softirq included) minus the CPU of other jobs' processes, minus the same for the no-probe "
                  "phase, minus the collector's CPU; what other jobs do in softirq stays in as noise. "
                  "Accounted = packets at the collector (+ reported ignored) / packets sent. At `max` the "
                  "no-probe phase runs unthrottled and the probes get the rate it reached.", ""]
        flow_lines = [ln for ln in lines if ln["sweep"] == "flows"]
        if flow_lines:
            parts += [f"### Concurrent flows at {rate_label(flow_lines[0]['pps_target'])}", "",
                      _sweep_table(flow_lines), ""]
        rate_lines = sorted((ln for ln in lines if ln["flows"] == profile_flows(sweep_meta.get(
            "rate_flows", RATE_SWEEP_FLOWS))), key=lambda ln: ln["pps_target"] or 1e12)
        if rate_lines:
            parts += [f"### Packet rate at {human_count(rate_lines[0]['flows'])} flows", "",
                      _sweep_table(rate_lines), ""]
        failed = [r for r in sweep if "error" in r]
        if failed:
            parts += ["Failed phases: " + "; ".join(f"{r['probe']} {r['flows']} flows {rate_label(r['pps_target'])}: "
                                                    f"{r['error']}" for r in failed), ""]
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    if pngs:
        parts += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    return "\n".join(parts)


def _sweep_table(lines: Sequence[dict[str, Any]]) -> str:
    headers = ["flows", "rate", "pps sent", "xdpflow CPU", "softflowd CPU", "CPU ratio", "overhead: xdpflow",
               "softflowd", "overhead ns/packet: empty XDP", "xdpflow", "softflowd", "others / min idle",
               "xdpflow RSS (peak) MB", "kernel maps MiB", "softflowd RSS MB", "accounted xdpflow", "softflowd",
               "records xdpflow / softflowd"]
    rows = []
    for ln in lines:
        pps = ", ".join(f"{p.replace('_', ' ')} {(_num(ln.get(f'{p}_pps_sent')) or 0) / 1e3:.0f}K" for p in PROBES
                        if f"{p}_pps_sent" in ln)
        ratio = ln.get("cpu_ratio")
        rows.append([
            ln["flows"], rate_label(ln["pps_target"]), pps, _cores(ln.get("xdpflow_probe_cpu_cores")),
            _cores(ln.get("softflowd_probe_cpu_cores")), f"{ratio:.2g}x" if isinstance(ratio, float) else "-",
            _cores(ln.get("xdpflow_overhead_cores")), _cores(ln.get("softflowd_overhead_cores")),
            ln.get("xdp_empty_overhead_ns_per_packet"), ln.get("xdpflow_overhead_ns_per_packet"),
            ln.get("softflowd_overhead_ns_per_packet"),
            f"{_cores(ln.get('none_others_cpu_cores'))} / {_cores(ln.get('min_idle_cores'))}",
            f"{ln.get('xdpflow_rss_mb', 0):.0f} ({ln.get('xdpflow_peak_rss_mb', 0):.0f})"
            if "xdpflow_rss_mb" in ln else "-",
            ln.get("xdpflow_kernel_map_mb"), ln.get("softflowd_rss_mb"),
            _pct(ln.get("xdpflow_accounted_ratio")), _pct(ln.get("softflowd_accounted_ratio")),
            f"{ln.get('xdpflow_collector_records') or 0:,.0f} / {ln.get('softflowd_collector_records') or 0:,.0f}",
        ])
    return md_table(headers, rows)


def _load_sweep(out_dir: Path) -> list[dict[str, Any]] | None:
    """sweep.json with the derived figures recomputed (so a report follows the current formulas)."""
    from tools.sweep import derive

    rows = _read_json(out_dir / "sweep.json")
    return derive(rows) if isinstance(rows, list) else None


def write_report(out_dir: Path) -> Path:
    """Plots and summary.md from every result file in out_dir."""
    from tools import plots

    pipeline = _read_json(out_dir / "pipeline.json")
    sweep = _load_sweep(out_dir)
    try:
        plots.write_plots(out_dir, [r for r in sweep or [] if "error" not in r], pipeline or [])
    except ImportError as e:
        _say(f"plots skipped: {e} (pip install matplotlib)")
    path = out_dir / "summary.md"
    path.write_text(summary_markdown(out_dir), encoding="utf-8")
    return path


# ---------------------------------------------------------------- commands

@dataclass(frozen=True)
class Plan:
    kernel_repeat: int
    kernel_rounds: int
    kernel_new_flows: int
    pipeline_flows: tuple[int, ...]
    pipeline_rounds: int
    sweep: SweepOptions


def plan_for(short: bool) -> Plan:
    if short:
        return Plan(500_000, 3, 10_000, (10_000, 100_000, 500_000), 2, SweepOptions.short())
    return Plan(1_000_000, 7, 20_000, (10_000, 100_000, 500_000, 1_000_000), 3, SweepOptions())


def run_kernel(out_dir: Path, repeat: int, rounds: int, new_flows: int) -> dict[str, Any]:
    _say(f"kernel: {rounds} rounds of {repeat:,} packets, {new_flows:,} new flows")
    k = bench_kernel(repeat, rounds, new_flows)
    _write_json(out_dir / "kernel.json", k)
    write_csv(out_dir / "kernel.csv", kernel_rows(k))
    return k


def run_pipeline(out_dir: Path, flows: Sequence[int], rounds: int) -> list[dict[str, Any]]:
    rows = []
    for n in flows:
        _say(f"pipeline: {n:,} flows, {rounds} rounds")
        row = pipeline_isolated(n, rounds)
        _say(f"  {row['records_per_s'] / 1e6:.2f}M records/s, scan CPU {row['cpu_s']:.3f} s, "
             f"peak RSS {row['peak_rss_mb']:.0f} MB")
        rows.append(row)
    _write_json(out_dir / "pipeline.json", rows)
    write_csv(out_dir / "pipeline.csv", rows)
    return rows


def run_sweep_cmd(out_dir: Path, opts: SweepOptions) -> list[dict[str, Any]]:
    import tempfile

    from tools.sweep import estimate_seconds, run_sweep

    _say(f"sweep: about {estimate_seconds(opts) / 60:.1f} min")
    _write_json(out_dir / "sweep_meta.json", {"timers": asdict(opts.timers), "measure": opts.measure,
                                              "pps": opts.pps, "rate_flows": opts.rate_flows,
                                              "repeat": opts.repeat, "flows": list(opts.flows),
                                              "rates": list(opts.rates), "xdp_mode": opts.xdp_mode})
    with tempfile.TemporaryDirectory(prefix="xdpflow-sweep-") as tmp:
        rows = run_sweep(opts, Path(tmp), out_dir / "logs", progress=_say)
    _write_json(out_dir / "sweep.json", rows)
    write_csv(out_dir / "sweep.csv", rows)
    write_csv(out_dir / "sweep_summary.csv", pivot([r for r in rows if "error" not in r]))
    return rows


def _int_list(text: str) -> list[int]:
    out = []
    for part in text.replace(",", " ").split():
        mult = 1
        p = part.lower()
        if p.endswith("k"):
            mult, p = 1_000, p[:-1]
        elif p.endswith("m"):
            mult, p = 1_000_000, p[:-1]
        out.append(int(float(p) * mult))
    return out


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    p.add_argument("--short", action="store_true", help="fewer points and shorter windows")


def _add_sweep_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sweep")
    g.add_argument("--flows", type=_int_list, default=None, metavar="LIST",
                   help="concurrent flows, e.g. '1,10,1K,1M' (default: 1..1M, --short: 100,10K,1M)")
    g.add_argument("--pps", type=int, default=None, help="fixed packet rate of the flow sweep (default: 100000)")
    g.add_argument("--rates", type=_int_list, default=None, metavar="LIST",
                   help="packet rates at --rate-flows, 0 = max (default: 10K,100K,0)")
    g.add_argument("--rate-flows", type=int, default=RATE_SWEEP_FLOWS, help="default: %(default)s")
    g.add_argument("--measure", type=float, default=None, help="window seconds (default 30, --short 10)")
    g.add_argument("--repeat", type=int, default=1, help="run every phase N times (medians reported)")
    g.add_argument("--probes", default=",".join(PROBES), help="default: %(default)s")
    g.add_argument("--scan-interval", type=float, default=Timers.scan_interval)
    g.add_argument("--active-timeout", type=float, default=Timers.active_timeout)
    g.add_argument("--idle-timeout", type=float, default=Timers.idle_timeout)
    g.add_argument("--xdp-mode", choices=("native", "generic"), default="native",
                   help="XDP mode of xdpflow and of the empty-program control (default: %(default)s)")


def _sweep_options(args: argparse.Namespace) -> SweepOptions:
    base = SweepOptions.short() if args.short else SweepOptions()
    probes = tuple(p for p in args.probes.split(",") if p)
    bad = set(probes) - set(PROBES)
    if bad:
        raise SystemExit(f"xdpflow bench: unknown probe(s) {sorted(bad)}; choose from {PROBES}")
    return SweepOptions(
        flows=tuple(args.flows) if args.flows is not None else base.flows,
        pps=args.pps if args.pps is not None else base.pps,
        rates=tuple(args.rates) if args.rates is not None else base.rates,
        rate_flows=args.rate_flows, measure=args.measure or base.measure, repeat=args.repeat,
        probes=probes, timers=Timers(args.scan_interval, args.active_timeout, args.idle_timeout),
        xdp_mode=args.xdp_mode)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The bench subcommands on `sub` (shared by `xdpflow bench` and `python -m tools.bench`)."""
    pk = sub.add_parser("kernel", help="ns/packet of the XDP program via BPF_PROG_TEST_RUN")
    _add_common(pk)
    pk.add_argument("--repeat", type=int, default=None, help="packets per batch run (default 1M, --short 500K)")
    pk.add_argument("--rounds", type=int, default=None, help="batch runs per case (default 7, --short 3)")
    pk.add_argument("--new-flows", type=int, default=None, help="single runs per new-flow case (default 20K)")
    pp = sub.add_parser("pipeline", help="user-space stages at N flows")
    _add_common(pp)
    pp.add_argument("--flows", type=_int_list, default=None, metavar="LIST",
                    help="default: 10K,100K,500K,1M (--short: 10K,100K,500K)")
    pp.add_argument("--rounds", type=int, default=None, help="timed scans per N, best reported (default 3)")
    pp.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    ps = sub.add_parser("sweep", help="real traffic: xdpflow vs softflowd across flows and packet rates")
    _add_common(ps)
    _add_sweep_options(ps)
    pa = sub.add_parser("all", help="kernel, pipeline and sweep, then the report")
    _add_common(pa)
    _add_sweep_options(pa)
    pr = sub.add_parser("report", help="rebuild plots and summary.md from the results in --out")
    pr.add_argument("--out", type=Path, default=DEFAULT_OUT)
    pe = sub.add_parser("exporter", help="one point: exporter process CPU with real traffic through a veth pair")
    pe.add_argument("--flows", type=int, default=100_000)
    pe.add_argument("--pps", type=int, default=200_000, help="trafgen packets/s, 0 = as fast as it goes "
                                                               "(default %(default)s)")
    pe.add_argument("--seconds", type=float, default=60.0)


def run(args: argparse.Namespace) -> int:
    what = args.what
    if what == "exporter":
        print(json.dumps(bench_exporter(args.flows, args.pps, args.seconds)))
        return 0
    if what == "pipeline" and args.in_process:
        for n in args.flows or [10_000]:
            print(json.dumps(pipeline_row(bench_pipeline(n, args.rounds or 3))), flush=True)
        return 0
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    if what == "report":
        _say(f"report: {write_report(out_dir)}")
        return 0
    pl = plan_for(args.short)
    t0 = time.monotonic()
    _write_json(out_dir / "machine.json", machine_info())
    if what in ("kernel", "all"):
        own = what == "kernel"   # `all` has sweep options of the same names
        run_kernel(out_dir, (args.repeat if own else None) or pl.kernel_repeat,
                   (args.rounds if own else None) or pl.kernel_rounds,
                   (args.new_flows if own else None) or pl.kernel_new_flows)
    if what in ("pipeline", "all"):
        flows = (args.flows if what == "pipeline" and args.flows else None) or pl.pipeline_flows
        run_pipeline(out_dir, flows, (args.rounds if what == "pipeline" else None) or pl.pipeline_rounds)
    if what in ("sweep", "all"):
        run_sweep_cmd(out_dir, _sweep_options(args))
    path = write_report(out_dir)
    _say(f"done in {(time.monotonic() - t0) / 60:.1f} min: {path}")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`xdpflow bench ...` (registered by exporter.cli)."""
    p = sub.add_parser("bench", help="benchmarks: kernel, pipeline, sweep (xdpflow vs softflowd), all",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning",
                   help="default: %(default)s")
    p.add_argument("--log-format", choices=("auto", "console", "json"), default="auto")
    register(p.add_subparsers(dest="what", required=True, metavar="WHAT"))
    p.set_defaults(func=_cli_run)


def _cli_run(args: argparse.Namespace) -> int:
    with _graceful_sigterm():
        return run(args)


@contextmanager
def _graceful_sigterm() -> Iterator[None]:
    """SIGTERM raises SystemExit, so every `finally` (children, namespaces) runs."""

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    from exporter import logs

    p = argparse.ArgumentParser(prog="xdpflow bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    register(p.add_subparsers(dest="what", required=True, metavar="WHAT"))
    args = p.parse_args(argv)
    logs.configure("warning")
    with _graceful_sigterm():
        return run(args)


if __name__ == "__main__":
    sys.exit(main())
