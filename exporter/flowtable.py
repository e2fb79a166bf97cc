"""The flow table: accumulate merged scans into flows, end them, hand them back.

Theory of operation. The table is one FLOW_RECORD array holding each live flow
once, kept sorted by (64-bit hash of the key bytes, key bytes), with the
parallel array of hashes. Sorting by a hash instead of the raw 48-byte key
(`records.key_view`) gives the same join but with integer sorts and searches:
at 500K keys a void argsort costs ~4x a uint64 one, and it is the largest
single cost of a scan. Keys whose hashes collide sit side by side in key-byte
order; every match is confirmed on the full key bytes, so a collision costs
time, never correctness.

`update()` folds a scan with array passes and no per-flow Python:

1. Order the scan by (hash, key): one integer argsort; only the rare runs of
   equal hashes (collisions, or a key repeated in the scan) get a second,
   byte-wise and input-order-stable sort.
2. Join: `searchsorted` of the scan's hashes in the table's, then a key-bytes
   comparison, splits the scan into flows already held and new flows.
3. Fold held flows in place (sum, min, max, OR; ToS from the earlier
   first_ms, ties broken as exporter/merge.py does) and merge new ones in at their sorted
   positions in one O(n) pass. A key repeated within one scan (two pages
   folded at once) is folded in a second pass, in input order.
4. Expire with vectorised masks: FIN or RST seen (END_OF_FLOW) before idle
   (END_IDLE) before active (END_ACTIVE). If a capacity is set and the
   survivors still exceed it, the least recently seen go with
   END_LACK_OF_RESOURCES (ties broken by key bytes). Ended flows leave the
   table, so a later packet of the same 5-tuple starts a new record.

Times are epoch milliseconds supplied by the caller; nothing here reads a
clock, which keeps the table deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from exporter.merge import first_flags_rank
from exporter.records import (
    END_ACTIVE,
    END_FORCED,
    END_IDLE,
    END_LACK_OF_RESOURCES,
    END_OF_FLOW,
    FLOW_RECORD,
    KEY_SIZE,
    TCP_FIN,
    TCP_RST,
    Records,
    as_keys,
    key_hash,
    less,
    order_by_hash,
    same_keys,
)

_END_REASONS = frozenset({END_IDLE, END_ACTIVE, END_OF_FLOW, END_FORCED, END_LACK_OF_RESOURCES})

U8 = npt.NDArray[np.uint8]
U64 = npt.NDArray[np.uint64]


def timeout_ms(name: str, seconds: float) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, got {seconds!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be positive and finite, got {seconds!r}")
    return max(1, round(seconds * 1000))


def _bytes(records: Records) -> U8:
    """(n, itemsize) uint8 rows: gathers and masks on these are ~7x faster than on the structured dtype."""
    return np.ascontiguousarray(records).view(np.uint8).reshape(len(records), records.dtype.itemsize)


def fold_direction(cur: Records, scan: Records, prefix: str = "") -> None:
    """Fold one direction's values (records.DIRECTION_FIELDS, names after `prefix`) of `scan` into `cur`:
    sums, last max, OR of flags, TTL min/max, and ToS and first flags of the earlier first packet
    (a tie as merge.py breaks it, so the fold does not depend on which record came first)."""
    p = prefix
    for name in ("packets", "octets"):
        cur[p + name] += scan[p + name]
    np.maximum(cur[p + "last_ms"], scan[p + "last_ms"], out=cur[p + "last_ms"])
    cur[p + "tcp_flags"] |= scan[p + "tcp_flags"]
    np.minimum(cur[p + "min_ttl"], scan[p + "min_ttl"], out=cur[p + "min_ttl"])
    np.maximum(cur[p + "max_ttl"], scan[p + "max_ttl"], out=cur[p + "max_ttl"])
    first, s_first = cur[p + "first_ms"], scan[p + "first_ms"]
    tie = s_first == first
    if tie.any():
        t_tos, t_ff = cur[p + "tos"][tie], cur[p + "first_flags"][tie]
        s_tos, s_ff = scan[p + "tos"][tie], scan[p + "first_flags"][tie]
        cur[p + "tos"][tie] = np.maximum(t_tos, s_tos)
        cur[p + "first_flags"][tie] = np.where(first_flags_rank(s_ff) > first_flags_rank(t_ff), s_ff, t_ff)
    earlier = s_first < first
    for name in ("tos", "first_flags", "first_ms"):
        cur[p + name][earlier] = scan[p + name][earlier]


@dataclass(frozen=True)
class RecordKind:
    """What the table holds: a dtype whose first KEY_SIZE bytes are the key, how two records of a key
    fold, and the start, end and TCP flags that expiry reads (a biflow spans both of its directions)."""

    dtype: np.dtype[np.void]
    fold: Callable[[Records, Records], None]
    first_ms: Callable[[Records], npt.NDArray[np.uint64]]
    last_ms: Callable[[Records], npt.NDArray[np.uint64]]
    tcp_flags: Callable[[Records], npt.NDArray[np.uint16]]


UNIFLOW = RecordKind(FLOW_RECORD, fold_direction, lambda t: t["first_ms"], lambda t: t["last_ms"],
                     lambda t: t["tcp_flags"])


class FlowTable:
    def __init__(self, active_timeout_s: float = 60, idle_timeout_s: float = 15, capacity: int | None = None,
                 kind: RecordKind = UNIFLOW) -> None:
        self.kind = kind
        self._row = kind.dtype.itemsize
        self.active_ms = timeout_ms("active_timeout_s", active_timeout_s)
        self.idle_ms = timeout_ms("idle_timeout_s", idle_timeout_s)
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer))
                                     or capacity <= 0):
            raise ValueError(f"capacity must be a positive integer or None, got {capacity!r}")
        self.capacity = None if capacity is None else int(capacity)
        self._rows: U8 = np.zeros((0, self._row), dtype=np.uint8)
        self._hash: U64 = np.zeros(0, dtype=np.uint64)

    def _records(self, rows: U8) -> Records:
        return rows.reshape(-1).view(self.kind.dtype)

    def __len__(self) -> int:
        return len(self._rows)

    def _table(self) -> Records:
        return self._records(self._rows)

    def packets_held(self) -> int:
        return int(self._table()["packets"].sum(dtype=np.uint64))

    def octets_held(self) -> int:
        return int(self._table()["octets"].sum(dtype=np.uint64))

    def flows(self) -> Records:
        """A copy of the live flows, in table order (hash, key bytes)."""
        return self._table().copy()

    def update(self, records: Records, now_ms: int) -> Records:
        """Fold one scan's merged records in, then return the flows that end at `now_ms`."""
        if records.dtype != self.kind.dtype or records.ndim != 1:
            raise TypeError(f"update() wants a 1-d array of the table's record dtype, got {records.dtype} with shape "
                            f"{records.shape}")
        if len(records):
            self._fold(records)
        return self._expire(int(now_ms))

    def expire_all(self, reason: int = END_FORCED) -> Records:
        """End every flow with `reason` (shutdown) and empty the table."""
        if reason not in _END_REASONS:
            raise ValueError(f"reason must be a flowEndReason in {sorted(_END_REASONS)}, got {reason!r}")
        out = self._table()
        out["end_reason"] = reason
        self._rows = np.zeros((0, self._row), dtype=np.uint8)
        self._hash = np.zeros(0, dtype=np.uint64)
        return out

    def _fold(self, records: Records) -> None:
        raw = _bytes(records)
        hashes = key_hash(raw[:, :KEY_SIZE])
        order = order_by_hash(hashes, raw[:, :KEY_SIZE])
        # One random gather up front; every later pass over the scan is then sequential, like the table's.
        rows = np.take(raw, order, axis=0)
        hashes = hashes[order]
        # Equal keys are adjacent now; the k-th repeat of a key goes in the k-th pass, keeping input order.
        same_h = np.flatnonzero(hashes[1:] == hashes[:-1])
        repeat = np.zeros(len(rows), dtype=bool)
        repeat[same_h + 1] = same_keys(rows[same_h, :KEY_SIZE], rows[same_h + 1, :KEY_SIZE])
        if not repeat.any():
            self._fold_unique(rows, hashes)
            return
        starts = np.flatnonzero(~repeat)
        rank = np.arange(len(rows)) - np.repeat(starts, np.diff(starts, append=len(rows)))
        for k in range(int(rank.max()) + 1):
            this = np.flatnonzero(rank == k)
            self._fold_unique(np.take(rows, this, axis=0), hashes[this])

    def find(self, keys: U8, hashes: U64) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.intp]]:
        """For (n, KEY_SIZE) key bytes and their hashes: whether the table holds each, and where.

        Where it does not, the position is where the key would be inserted to keep the order.
        """
        held = self._rows
        pos = np.searchsorted(self._hash, hashes, side="left")
        matched = np.zeros(len(keys), dtype=bool)
        if len(held):
            found = np.flatnonzero(self._hash[np.minimum(pos, len(held) - 1)] == hashes)
            same = same_keys(held[pos[found], :KEY_SIZE], keys[found])
            matched[found[same]] = True
            if not same.all():
                self._resolve_collisions(keys, hashes, found[~same], pos, matched)
        return matched, pos

    def _fold_unique(self, rows: U8, hashes: U64) -> None:
        """Fold scan rows with distinct keys, sorted by (hash, key bytes)."""
        held = self._rows
        held_h = self._hash
        matched, pos = self.find(rows[:, :KEY_SIZE], hashes)

        hit = np.flatnonzero(matched)
        if len(hit):
            at = pos[hit]
            cur = self._records(np.take(held, at, axis=0))
            self.kind.fold(cur, self._records(np.take(rows, hit, axis=0)))
            held[at] = _bytes(cur)

        new = np.flatnonzero(~matched)
        if len(new):
            # New rows go before the held row at their search position; held rows shift by the inserts before them.
            at_new = pos[new] + np.arange(len(new))
            at_held = np.arange(len(held)) + np.searchsorted(pos[new], np.arange(len(held)), side="right")
            merged = np.empty((len(held) + len(new), self._row), dtype=np.uint8)
            merged[at_held] = held
            merged[at_new] = np.take(rows, new, axis=0)
            merged_h = np.empty(len(merged), dtype=np.uint64)
            merged_h[at_held] = held_h
            merged_h[at_new] = hashes[new]
            self._records(merged)["end_reason"][at_new] = 0
            self._rows, self._hash = merged, merged_h

    def _resolve_collisions(self, keys: U8, hashes: U64, clash: npt.NDArray[np.intp], pos: npt.NDArray[np.intp],
                            matched: npt.NDArray[np.bool_]) -> None:
        """Scan keys whose hash the table holds under other key(s): search that run of equal hashes by bytes."""
        held_keys = self._rows[:, :KEY_SIZE]
        start = pos[clash]
        run = np.searchsorted(self._hash, hashes[clash], side="right") - start
        below = np.zeros(len(clash), dtype=np.intp)
        hit = np.full(len(clash), -1, dtype=np.intp)
        for k in range(int(run.max())):
            live = np.flatnonzero(k < run)
            other = held_keys[start[live] + k]
            mine = keys[clash[live]]
            equal = same_keys(other, mine)
            hit[live[equal]] = start[live[equal]] + k
            below[live] += less(other, mine)
        found = hit >= 0
        matched[clash[found]] = True
        pos[clash[found]] = hit[found]
        pos[clash[~found]] = start[~found] + below[~found]

    def _expire(self, now_ms: int) -> Records:
        table = self._table()
        kind = self.kind
        if not len(table):
            return np.zeros(0, dtype=kind.dtype)
        # Signed: a record stamped after `now_ms` (clock step, or a caller passing 0) is simply not due.
        now = np.int64(now_ms)
        reason = np.zeros(len(table), dtype=np.uint8)
        reason[now - kind.first_ms(table).astype(np.int64) >= self.active_ms] = END_ACTIVE
        reason[now - kind.last_ms(table).astype(np.int64) >= self.idle_ms] = END_IDLE
        reason[(kind.tcp_flags(table) & (TCP_FIN | TCP_RST)) != 0] = END_OF_FLOW
        ended = reason != 0
        survivors = len(table) - int(np.count_nonzero(ended))
        if self.capacity is not None and survivors > self.capacity:
            self._evict_least_recent(ended, reason, survivors - self.capacity)
            ended = reason != 0
        if not ended.any():
            return np.zeros(0, dtype=kind.dtype)
        out = self._records(self._rows[ended])
        out["end_reason"] = reason[ended]
        kept = ~ended
        self._rows = self._rows[kept]
        self._hash = self._hash[kept]
        return out

    def _evict_least_recent(self, ended: npt.NDArray[np.bool_], reason: npt.NDArray[np.uint8], excess: int) -> None:
        """Mark the `excess` surviving flows with the oldest last_ms (ties by key bytes), without a full sort."""
        survivors = np.flatnonzero(~ended)
        last = self.kind.last_ms(self._table())[survivors]
        threshold = np.partition(last, excess - 1)[excess - 1]
        reason[survivors[last < threshold]] = END_LACK_OF_RESOURCES
        tied = survivors[last == threshold]
        need = excess - int(np.count_nonzero(last < threshold))
        if need < len(tied):
            tied = tied[np.argsort(as_keys(self._rows[tied, :KEY_SIZE]), kind="stable")[:need]]
        reason[tied] = END_LACK_OF_RESOURCES


class Timed(Protocol):
    active_ms: int
    idle_ms: int


def retime(table: Timed, active_timeout_s: float, idle_timeout_s: float) -> None:
    """Change a live table's timeouts (SIGHUP); flows held keep their counters and start times."""
    active_ms = timeout_ms("active_timeout_s", active_timeout_s)
    idle_ms = timeout_ms("idle_timeout_s", idle_timeout_s)
    table.active_ms, table.idle_ms = active_ms, idle_ms
