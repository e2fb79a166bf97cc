"""Fold per-CPU flow values into one record per flow.

A per-CPU map returns, for each key, one FLOW_VALUE per possible CPU. A slot
whose packets is 0 belongs to a CPU that never saw the flow. The fold is a
reduction along the CPU axis of a (flows, cpus) array: sum packets and octets,
min first-seen and max last-seen over the slots that saw packets, OR the TCP
flags, min/max TTL, and the ToS of the earliest slot (the highest on a tie). It is order-independent
across CPUs by construction (tests/unit/test_merge.py checks it).

Kernel times are CLOCK_MONOTONIC nanoseconds; they become epoch milliseconds
with one offset measured per scan (`clock_offset_ns()`), so every record of a
scan shares the same conversion.
"""

from __future__ import annotations

import time

import numpy as np
import numpy.typing as npt

from exporter.layout import FLOW_KEY
from exporter.records import FLOW_RECORD, Records

_U64_MAX = np.iinfo(np.uint64).max


def clock_offset_ns() -> int:
    """Wall clock minus the monotonic clock the kernel stamps with, now."""
    return time.time_ns() - time.monotonic_ns()


def merge(keys: npt.NDArray[np.void], values: npt.NDArray[np.void], offset_ns: int,
          first_flags: bool = True) -> Records:
    """keys: (n,) FLOW_KEY; values: (n, cpus) FLOW_VALUE -> (m,) FLOW_RECORD, m <= n.

    Entries whose slots all hold 0 packets (possible after an insert that
    raced a drain) are dropped: they carry nothing to export. `first_flags`
    False leaves that field 0: only biflows read it (~7 % of the merge).
    """
    n = len(keys)
    out = np.zeros(n, dtype=FLOW_RECORD)
    if n == 0:
        return out
    for name in FLOW_KEY.names or ():
        out[name] = keys[name]
    packets = values["packets"]
    seen = packets > 0
    out["packets"] = packets.sum(axis=1)
    out["octets"] = values["octets"].sum(axis=1)
    first = np.where(seen, values["first_seen_ns"], _U64_MAX)
    first_ns = first.min(axis=1)
    last_ns = np.where(seen, values["last_seen_ns"], 0).max(axis=1)
    out["tcp_flags"] = np.bitwise_or.reduce(np.where(seen, values["tcp_flags"], 0), axis=1)
    # ToS of the earliest slot; on a tie the highest, so CPU order never matters.
    earliest = seen & (first == first_ns[:, None])
    out["tos"] = np.where(earliest, values["tos"], 0).max(axis=1)
    if first_flags:
        # Slots that started in the same clock tick: a bare SYN is the connection's first packet wherever
        # it landed, so it wins; otherwise the highest flags, again independent of CPU order.
        flags = values["first_flags"].astype(np.uint16)
        bare_syn = (flags & 0x12) == 0x02
        out["first_flags"] = (np.where(earliest, flags | (bare_syn << 8), 0).max(axis=1) & 0xFF).astype(np.uint8)
    out["min_ttl"] = np.where(seen, values["min_ttl"], 255).min(axis=1)
    out["max_ttl"] = np.where(seen, values["max_ttl"], 0).max(axis=1)
    out["first_ms"] = ns_to_epoch_ms(first_ns, offset_ns)
    out["last_ms"] = ns_to_epoch_ms(last_ns, offset_ns)
    return out[out["packets"] > 0]


def ns_to_epoch_ms(mono_ns: npt.NDArray[np.uint64], offset_ns: int) -> npt.NDArray[np.uint64]:
    return ((mono_ns.astype(np.int64) + np.int64(offset_ns)) // 1_000_000).astype(np.uint64)
