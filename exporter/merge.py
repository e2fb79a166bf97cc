"""Turn a drained page's slots into flow records, and fold the slots of one flow together.

A page holds one slot per (flow, CPU that saw it) for its scan interval (xdp/flow.h, struct
flow_slot); a flow the LRU forgot and met again in the same interval may hold more than one
slot of a CPU. `to_records` gives each slot's FLOW_RECORD; `merge` folds records of equal keys
into one: sum packets and octets, min first-seen and max last-seen, OR the TCP flags, min/max
TTL, and the ToS and first-packet flags of the earliest record (on a tie the highest ToS; a bare
SYN first, then the highest flags). Every step is commutative and associative, so the result
does not depend on the order of the slots (tests/unit/test_merge.py checks it); the flow table
folds by the same rule (exporter/flowtable.py), and so does the compiled core (exporter/_core.c).

Times: programs stamp packets in jiffies. The page's interval is bracketed by two clock readings
(jiffies and CLOCK_MONOTONIC_COARSE read together in the kernel at the flips that opened and
closed it); `TimeBase` maps jiffies onto the monotonic clock along that line, and one wall-minus-
monotonic offset measured per scan (`clock_offset_ns()`) makes them epoch milliseconds (IEs
152/153), so every record of a scan shares the same conversion.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from exporter.records import FLOW_RECORD, Records, key_order, key_view
from xdp.layout import FLOW_KEY

NS_PER_MS = 1_000_000


def clock_offset_ns() -> int:
    """Wall clock minus the monotonic clock the kernel stamps with, now."""
    return time.time_ns() - time.monotonic_ns()


@dataclass(frozen=True)
class TimeBase:
    """jiffies -> CLOCK_MONOTONIC ns over one page's interval: the readings at its two flips."""

    start_jiffies: int
    start_ns: int
    end_jiffies: int
    end_ns: int

    @property
    def slope(self) -> float:
        """ns per jiffy over the interval (0 when it lasted less than a tick)."""
        ticks = self.end_jiffies - self.start_jiffies
        return (self.end_ns - self.start_ns) / ticks if ticks > 0 else 0.0

    def to_ns(self, jiffies: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        """Monotonic ns of each jiffies value (exporter/_core.c computes the same doubles)."""
        ticks = jiffies.astype(np.int64) - np.int64(self.start_jiffies)
        return np.int64(self.start_ns) + np.floor(ticks.astype(np.float64) * self.slope + 0.5).astype(np.int64)

    def __post_init__(self) -> None:
        if not math.isfinite(self.slope):
            raise ValueError(f"clock readings out of order: {self}")


def ns_to_epoch_ms(mono_ns: npt.NDArray[np.int64], offset_ns: int) -> npt.NDArray[np.uint64]:
    return ((mono_ns.astype(np.int64) + np.int64(offset_ns)) // NS_PER_MS).astype(np.uint64)


def to_records(slots: npt.NDArray[np.void], base: TimeBase, offset_ns: int) -> Records:
    """(n,) FLOW_SLOT -> (m,) FLOW_RECORD, one per slot that holds packets (a slot a program
    never wrote holds none), times in epoch ms."""
    slots = slots[slots["value"]["packets"] > 0]
    out = np.zeros(len(slots), dtype=FLOW_RECORD)
    if not len(slots):
        return out
    key, value = slots["key"], slots["value"]
    for name in FLOW_KEY.names or ():
        out[name] = key[name]
    for name in ("packets", "octets", "tcp_flags", "tos", "min_ttl", "max_ttl", "first_flags"):
        out[name] = value[name]
    out["first_ms"] = ns_to_epoch_ms(base.to_ns(value["first_seen"]), offset_ns)
    out["last_ms"] = ns_to_epoch_ms(base.to_ns(value["last_seen"]), offset_ns)
    return out


def first_flags_rank(flags: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint16]:
    """Order of first-packet flags among records that started in the same ms: a bare SYN first."""
    f = flags.astype(np.uint16)
    return f | (((f & 0x12) == 0x02).astype(np.uint16) << 8)


def merge(records: Records) -> Records:
    """Fold FLOW_RECORDs of equal keys into one each (in key order); see the module docstring."""
    n = len(records)
    if n == 0:
        return records.copy()
    order = key_order(records)
    rec = records[order]
    keys = key_view(rec)
    start = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    out = rec[start].copy()
    if len(start) == n:
        return out
    out["packets"] = np.add.reduceat(rec["packets"], start)
    out["octets"] = np.add.reduceat(rec["octets"], start)
    out["last_ms"] = np.maximum.reduceat(rec["last_ms"], start)
    out["tcp_flags"] = np.bitwise_or.reduceat(rec["tcp_flags"], start)
    out["min_ttl"] = np.minimum.reduceat(rec["min_ttl"], start)
    out["max_ttl"] = np.maximum.reduceat(rec["max_ttl"], start)
    first = np.minimum.reduceat(rec["first_ms"], start)
    out["first_ms"] = first
    group = np.repeat(np.arange(len(start)), np.diff(start, append=n))
    earliest = rec["first_ms"] == first[group]
    out["tos"] = np.maximum.reduceat(np.where(earliest, rec["tos"], 0), start)
    rank = np.maximum.reduceat(np.where(earliest, first_flags_rank(rec["first_flags"]), 0), start)
    out["first_flags"] = (rank & 0xFF).astype(np.uint8)
    return out
