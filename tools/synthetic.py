"""Synthetic flow records for tests and benchmarks (test-only code, kept out of the product).

- `random_records`: plausible random FLOW_RECORDs (IPv4 and IPv6, every protocol, any counters);
- `synthetic_flows`: n IPv4 TCP flows with distinct keys, as a flow table sees them;
- `encode_rate` / `table_update_rate`: records/s of the numpy encoder and flow table on them.
"""

from __future__ import annotations

import math
import time
import timeit
from collections.abc import Callable

import numpy as np

from exporter.flowtable import FlowTable
from exporter.ipfix.encoder import Encoder
from exporter.records import FLOW_RECORD, Records


def random_records(n: int, seed: int = 0, ipv6_share: float = 0.2) -> Records:
    """n plausible random flow records (for benchmarks and tests)."""
    rng = np.random.default_rng(seed)
    recs = np.zeros(n, dtype=FLOW_RECORD)
    v6 = rng.random(n) < ipv6_share
    recs["ip_version"] = np.where(v6, 6, 4)
    for name in ("src_addr", "dst_addr"):
        addr = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
        addr[~v6, :10] = 0
        addr[~v6, 10:12] = 0xFF
        recs[name] = addr
    recs["protocol"] = rng.choice(np.array([6, 17, 1, 58], dtype=np.uint8), size=n, p=[0.6, 0.3, 0.05, 0.05])
    recs["src_port"] = rng.integers(0, 65536, n)
    recs["dst_port"] = rng.integers(0, 65536, n)
    recs["ifindex"] = rng.integers(1, 64, n)
    recs["vlan_id"] = rng.integers(0, 4096, n)
    recs["packets"] = rng.integers(1, 1 << 20, n)
    recs["octets"] = recs["packets"] * rng.integers(40, 1500, n).astype(np.uint64)
    recs["first_ms"] = 1_700_000_000_000 + rng.integers(0, 60_000, n)
    recs["last_ms"] = recs["first_ms"] + rng.integers(0, 60_000, n).astype(np.uint64)
    recs["tcp_flags"] = rng.integers(0, 512, n)
    recs["tos"] = rng.integers(0, 256, n)
    recs["min_ttl"] = rng.integers(1, 128, n)
    recs["max_ttl"] = recs["min_ttl"] + rng.integers(0, 128, n).astype(np.uint8)
    recs["end_reason"] = rng.integers(1, 6, n)
    return recs


def synthetic_flows(rng: np.random.Generator, n: int) -> Records:
    """n IPv4 TCP flows with distinct random keys, in random order."""
    out = np.zeros(n, dtype=FLOW_RECORD)
    out["src_addr"][:, 10:12] = 0xFF
    out["dst_addr"][:, 10:12] = 0xFF
    out["src_addr"][:, 12:] = rng.permutation(n).astype(">u4").view(np.uint8).reshape(n, 4)
    out["dst_addr"][:, 12:] = rng.integers(0, 256, (n, 4), dtype=np.uint8)
    out["src_port"] = rng.integers(1024, 65536, n)
    out["dst_port"] = 443
    out["protocol"] = 6
    out["ip_version"] = 4
    out["ifindex"] = 2
    out["packets"] = rng.integers(1, 100, n)
    out["octets"] = out["packets"] * 800
    out["tcp_flags"] = 0x18
    out["min_ttl"] = 60
    out["max_ttl"] = 64
    return out


def encode_rate(n: int = 500_000, mtu: int = 1400, repeat: int = 5) -> float:
    """Records per second for encode() of n random records (best of `repeat` runs)."""
    records = random_records(n)
    best = float("inf")
    for _ in range(repeat):
        encoder = Encoder(mtu=mtu)
        start = time.perf_counter()
        encoder.encode(records, 1_700_000_000.0)
        best = min(best, time.perf_counter() - start)
    return n / best


def table_update_rate(n: int, repeat: int = 3, clock: Callable[[], float] = timeit.default_timer) -> float:
    """Records/s of one `update()` of n records (90% already held) into a table of n flows; best of `repeat`.

    Nothing ends during the timed call, so it measures the fold plus the expiry scan. On a shared
    machine pass `clock=time.process_time` to measure CPU rather than wall time.
    """
    rng = np.random.default_rng(1)
    flows = synthetic_flows(rng, n + n // 10)
    best = math.inf
    for _ in range(repeat):
        table = FlowTable(active_timeout_s=60, idle_timeout_s=15)
        held = flows[:n].copy()
        held["first_ms"] = held["last_ms"] = 1_000_000
        table.update(held, 1_000_000)
        scan = rng.permutation(flows[n // 10:])
        scan["first_ms"] = scan["last_ms"] = 1_010_000
        t0 = clock()
        table.update(scan, 1_010_000)
        best = min(best, clock() - t0)
    return n / best
