"""Benchmarks (timing lives here, never in pass/fail tests).

`pipeline`: the user-space path alone at N flows. A flow page is filled with
N synthetic entries through BPF_MAP_UPDATE_BATCH (real kernel map, real batch
drain), then one scan is timed stage by stage: drain (flip excluded: it is an
RCU wait, not CPU), merge, flow table, IPFIX encode, UDP send to a loopback
sink. The table is primed with the same flows first, so the scan is the steady
state of a busy exporter: every flow already known, all of them exported
(active timeout reached). Reports records/s per stage and in total, CPU time
and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass
class StageTimes:
    flows: int
    drain_s: float
    merge_s: float
    table_s: float
    encode_s: float
    send_s: float
    datagrams: int
    cpu_s: float
    peak_rss_mb: float

    @property
    def total_s(self) -> float:
        return self.drain_s + self.merge_s + self.table_s + self.encode_s + self.send_s

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_s"] = self.total_s
        d["records_per_s"] = self.flows / self.total_s if self.total_s else 0.0
        for stage in ("drain", "merge", "table", "encode", "send"):
            t = d[f"{stage}_s"]
            d[f"{stage}_rps"] = self.flows / t if t else float("inf")
        return d


def synthetic_page(n: int, cpus: int, now_ns: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    from exporter.layout import FLOW_KEY, FLOW_VALUE

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
    values = np.zeros((n, cpus), dtype=FLOW_VALUE)
    values["packets"] = rng.integers(0, 100, (n, cpus), dtype=np.uint64)
    values["packets"][:, 0] += 1
    values["octets"] = values["packets"] * np.uint64(500)
    values["first_seen_ns"] = np.uint64(now_ns - 5_000_000_000)
    values["last_seen_ns"] = np.uint64(now_ns)
    values["min_ttl"] = 60
    values["max_ttl"] = 64
    return keys, values


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_pipeline(n: int) -> StageTimes:
    from exporter.drain import Pages
    from exporter.flowtable import FlowTable
    from exporter.ipfix.encoder import Encoder
    from exporter.merge import clock_offset_ns, merge
    from xdp import bpfsys
    from xdp.loader import Datapath

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.connect(sink.getsockname())
    out.setblocking(False)
    # An LRU map starts evicting before it is full (free nodes sit on per-CPU lists), so leave headroom.
    with Datapath(max_entries=n + n // 8 + 1024, memory_budget=8 << 30).load() as dp:
        pages = Pages(dp)
        idle = pages.active ^ 1
        keys, values = synthetic_page(n, dp.cpus, time.monotonic_ns())
        table = FlowTable(active_timeout_s=60, idle_timeout_s=15)
        enc = Encoder(odid=1, mtu=1400)
        offset = clock_offset_ns()
        now_ms = (time.monotonic_ns() + offset) // 1_000_000
        # Prime the table with the same flows (steady state), then time one full scan.
        bpfsys.map_update_batch(dp.page_fds[idle], keys, values, n)
        k, v = pages.drain(idle)
        table.update(merge(k, v, offset), now_ms)
        assert bpfsys.map_update_batch(dp.page_fds[idle], keys, values, n) == n
        cpu0 = time.process_time()
        (k, v), t_drain = _timed(lambda: pages.drain(idle))
        assert len(k) == n, f"drained {len(k)} of {n}"
        recs, t_merge = _timed(lambda: merge(k, v, offset))
        expired, t_table = _timed(lambda: table.update(recs, now_ms + 61_000))
        assert len(expired) == n
        dgrams, t_enc = _timed(lambda: enc.encode(expired, time.time()))

        def send() -> None:
            for d in dgrams:
                try:
                    out.send(d)
                except BlockingIOError:
                    pass

        _, t_send = _timed(send)
        cpu = time.process_time() - cpu0
    sink.close()
    out.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return StageTimes(n, t_drain, t_merge, t_table, t_enc, t_send, len(dgrams), cpu, rss)


EMPTY_XDP = "int empty(struct xdp_md *ctx) { return XDP_PASS; }\n"


def _kernel_frames() -> dict[str, bytes]:
    from tools.packets import TCP, UDP, Flow

    return {
        "ipv4_tcp": Flow("t", "198.18.0.1", "198.19.0.1", TCP, 40000, 443, tcp_flags=0x10, payload_len=0).frame(),
        "ipv6_udp": Flow("u", "fd00::1", "fd00::2", UDP, 5000, 53, payload_len=32).frame(),
        "vlan_ipv4_udp": Flow("v", "198.18.0.1", "198.19.0.1", UDP, 1, 2, vlan=42, payload_len=32).frame(),
    }


def _varied(frame: bytes, i: int) -> bytes:
    """The same IPv4 frame with source port i (offset 34): a new flow per i."""
    return frame[:34] + (i & 0xFFFF).to_bytes(2, "big") + frame[36:38] + (i >> 16 & 0xFFFF).to_bytes(2, "big") \
        + frame[40:]


def bench_kernel(repeat: int = 1_000_000, rounds: int = 5, new_flows: int = 20_000) -> dict[str, Any]:
    """ns/packet from BPF_PROG_TEST_RUN: min and median over `rounds` runs of `repeat` packets."""
    from bcc import BPF

    from exporter.drain import Pages
    from xdp import bpfsys
    from xdp.headers import find
    from xdp.loader import Datapath

    found = find()
    with found.applied():
        empty = BPF(text=EMPTY_XDP.encode(), cflags=["-w", *found.cflags])
    empty_fd = empty.load_func(b"empty", BPF.XDP).fd
    out: dict[str, Any] = {}

    def series(fd: int, frame: bytes) -> dict[str, float]:
        ns = sorted(bpfsys.prog_test_run(fd, frame, repeat=repeat).duration_ns for _ in range(rounds))
        return {"min_ns": ns[0], "median_ns": ns[len(ns) // 2]}

    frames = _kernel_frames()
    out["empty_program"] = series(empty_fd, frames["ipv4_tcp"])
    table = new_flows * 4
    with Datapath(max_entries=table + table // 8 + 1024).load() as dp:
        for name, frame in frames.items():
            out[f"hit_{name}"] = series(dp.prog_fd, frame)

        def one_each(start: int) -> float:
            runs = [bpfsys.prog_test_run(dp.prog_fd, _varied(frames["ipv4_tcp"], start + i)).duration_ns
                    for i in range(new_flows)]
            runs.sort()
            return float(runs[len(runs) // 2])

        pages = Pages(dp)
        pages.flip_and_drain()
        pages.flip_and_drain()
        # Hits measured one run at a time too, so the new-flow figure has a like-for-like reference.
        one_each(1)
        out["hit_single_run_median_ns"] = one_each(1)
        pages.flip_and_drain()
        pages.flip_and_drain()
        out["new_flow_empty_table_median_ns"] = one_each(100_000)
    with Datapath(max_entries=new_flows).load() as dp:
        for i in range(3):  # fill well past capacity so every insert evicts
            for j in range(new_flows):
                bpfsys.prog_test_run(dp.prog_fd, _varied(frames["ipv4_tcp"], 1_000_000 + i * new_flows + j))
        runs = sorted(bpfsys.prog_test_run(dp.prog_fd, _varied(frames["ipv4_tcp"], 5_000_000 + j)).duration_ns
                      for j in range(new_flows))
        out["new_flow_full_table_median_ns"] = float(runs[len(runs) // 2])
        out["full_table_stats"] = dp.read_stats()
    empty.cleanup()
    return out


def flow_grid(flows: int) -> tuple[int, int]:
    """Two coprime cycle lengths a x b == flows (or just above) for trafgen's dinc counters."""
    if flows <= 60000:
        return flows, 1
    b = 2
    while True:
        a = -(-flows // b)
        if np.gcd(a, b) == 1 and a <= 60000:
            return a, b
        b += 1


def trafgen_profile(flows: int, payload: int = 18) -> str:
    """One trafgen packet whose UDP ports step through `flows` distinct pairs (dinc counters)."""
    a, b = flow_grid(flows)
    dp = f"dinc(1, {b})" if b > 1 else "53"
    return ("{ eth(da=02:00:00:00:00:02, sa=02:00:00:00:00:01), ipv4(saddr=198.18.0.1, daddr=198.19.0.1), "
            f"udp(sp=dinc(1, {a}), dp={dp}), fill(0, {payload}) }}\n")


def proc_cpu_seconds(pid: int) -> float:
    import os

    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_exporter(flows: int, pps: int, seconds: float, scan_interval: float = 10.0) -> dict[str, Any]:
    """Real traffic through a veth pair into `xdpflow run`; the exporter process's CPU over `seconds`."""
    import os
    import signal
    import subprocess
    import tempfile

    from tools.netns import VethPair, in_netns

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with VethPair() as pair, tempfile.NamedTemporaryFile("w", suffix=".cfg") as cfg:
        cfg.write(trafgen_profile(flows))
        cfg.flush()
        sink = subprocess.Popen(in_netns(pair.obs, [sys.executable, "-m", "exporter.cli", "collect", "--listen",
                                                    "127.0.0.1:4739", "--quiet", "--log-format", "json"]),
                                cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        exp = subprocess.Popen(in_netns(pair.obs, [sys.executable, "-m", "exporter.cli", "run", "--interface",
                                                   pair.obs_if, "--scan-interval", str(scan_interval),
                                                   "--log-format", "json"]),
                               cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        gen = None
        try:
            assert exp.stderr is not None
            for line in exp.stderr:
                if '"exporting"' in line:
                    break
            gen = subprocess.Popen(in_netns(pair.gen, ["trafgen", "--dev", pair.gen_if, "--conf", cfg.name,
                                                       "--cpus", "1", *(["--rate", f"{pps}pps"] if pps else []),
                                                       "--no-sock-mem", "--no-cpu-stats", "--notouch-irq"]),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(min(5.0, seconds / 4))  # let the table fill before measuring
            if gen.poll() is not None:
                raise RuntimeError(f"trafgen stopped: {gen.stderr.read() if gen.stderr else ''}")
            rx0 = _rx_packets(pair)
            c0, t0 = proc_cpu_seconds(exp.pid), time.monotonic()
            time.sleep(seconds)
            c1, t1 = proc_cpu_seconds(exp.pid), time.monotonic()
            rx = _rx_packets(pair) - rx0
            rss = _rss_mb(exp.pid)
        finally:
            if gen is not None:
                gen.send_signal(signal.SIGINT)
                try:
                    gen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    gen.kill()
                    gen.wait()
            exp.send_signal(signal.SIGTERM)
            exp.wait(timeout=60)
            sink.send_signal(signal.SIGTERM)
            sink.wait(timeout=30)
    return {"flows": flows, "pps_target": pps, "pps_measured": round(rx / (t1 - t0)),
            "seconds": round(t1 - t0, 2), "exporter_cpu_s": round(c1 - c0, 3),
            "cpu_share": round((c1 - c0) / (t1 - t0), 4), "rss_mb": rss}


def _rx_packets(pair: Any) -> int:
    import subprocess

    from tools.netns import in_netns

    path = f"/sys/class/net/{pair.obs_if}/statistics/rx_packets"
    out = subprocess.run(in_netns(pair.obs, ["cat", path]), capture_output=True, text=True, check=True).stdout
    return int(out)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xdpflow bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    pp = sub.add_parser("pipeline", help="user-space stages at N flows")
    pp.add_argument("--flows", type=int, nargs="+", default=[10_000, 100_000, 500_000])
    pp.add_argument("--json", action="store_true")
    pe = sub.add_parser("exporter", help="exporter process CPU with real traffic through a veth pair")
    pe.add_argument("--flows", type=int, default=100_000)
    pe.add_argument("--pps", type=int, default=200_000, help="trafgen packets/s, 0 = as fast as it goes "
                                                               "(default %(default)s)")
    pe.add_argument("--seconds", type=float, default=60.0)
    pk = sub.add_parser("kernel", help="ns/packet of the XDP program via BPF_PROG_TEST_RUN")
    pk.add_argument("--repeat", type=int, default=1_000_000)
    pk.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    if args.what == "kernel":
        print(json.dumps(bench_kernel(args.repeat, args.rounds), indent=1))
    if args.what == "exporter":
        print(json.dumps(bench_exporter(args.flows, args.pps, args.seconds)))
    if args.what == "pipeline":
        for n in args.flows:
            row = bench_pipeline(n).row()
            if args.json:
                print(json.dumps(row))
            else:
                print(f"{n:>8} flows: total {row['records_per_s'] / 1e6:5.2f} M rec/s ({row['total_s']:.3f} s, "
                      f"cpu {row['cpu_s']:.3f} s) | drain {row['drain_rps'] / 1e6:5.2f} merge "
                      f"{row['merge_rps'] / 1e6:5.2f} table {row['table_rps'] / 1e6:5.2f} encode "
                      f"{row['encode_rps'] / 1e6:5.2f} send {row['send_rps'] / 1e6:5.2f} M rec/s | "
                      f"{row['datagrams']} datagrams | peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
