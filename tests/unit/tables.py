"""Flow-table test cases shared by the reference table's tests and the compiled core's.

A record type, a dict-per-flow model of the table, and a hypothesis strategy for scenarios: keys
from a small pool so flows repeat across scans, times advancing in steps comparable to the
timeouts so every end reason happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from hypothesis import strategies as st

from exporter.records import (
    END_ACTIVE,
    END_FORCED,
    END_IDLE,
    END_LACK_OF_RESOURCES,
    END_OF_FLOW,
    FLOW_RECORD,
    KEY_SIZE,
    Records,
)

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
FLAG_CHOICES = [0, SYN, ACK, PSH | ACK, SYN | ACK, FIN | ACK, RST, RST | ACK]
VALUE_FIELDS = ("packets", "octets", "first_ms", "last_ms", "tcp_flags", "tos", "min_ttl", "max_ttl", "end_reason")


@dataclass(frozen=True)
class Rec:
    key: bytes
    packets: int
    octets: int
    first_ms: int
    last_ms: int
    tcp_flags: int
    tos: int
    min_ttl: int
    max_ttl: int
    end_reason: int = 0


@dataclass
class Model:
    """One dict entry per live flow, folded one record at a time: the obvious, slow table."""

    active_ms: int
    idle_ms: int
    capacity: int | None
    flows: dict[bytes, Rec] = field(default_factory=dict)

    def update(self, recs: list[Rec], now: int) -> list[Rec]:
        for r in recs:
            held = self.flows.get(r.key)
            if held is None:
                self.flows[r.key] = replace(r, end_reason=0)
                continue
            earlier = r.first_ms < held.first_ms
            # ToS of the earlier first packet; a tie goes to the higher (merge.py's rule: any order folds alike).
            tos = r.tos if earlier else max(held.tos, r.tos) if r.first_ms == held.first_ms else held.tos
            self.flows[r.key] = replace(
                held, packets=held.packets + r.packets, octets=held.octets + r.octets,
                first_ms=min(held.first_ms, r.first_ms), last_ms=max(held.last_ms, r.last_ms),
                tcp_flags=held.tcp_flags | r.tcp_flags, tos=tos,
                min_ttl=min(held.min_ttl, r.min_ttl), max_ttl=max(held.max_ttl, r.max_ttl))
        out = []
        for key, f in list(self.flows.items()):
            reason = rule_reason(f, now, self.active_ms, self.idle_ms)
            if reason:
                out.append(replace(f, end_reason=reason))
                del self.flows[key]
        if self.capacity is not None and len(self.flows) > self.capacity:
            oldest = sorted(self.flows.values(), key=lambda f: (f.last_ms, f.key))
            for f in oldest[: len(self.flows) - self.capacity]:
                out.append(replace(f, end_reason=END_LACK_OF_RESOURCES))
                del self.flows[f.key]
        return out


def rule_reason(f: Rec, now: int, active_ms: int, idle_ms: int) -> int:
    if f.tcp_flags & (FIN | RST):
        return END_OF_FLOW
    if now - f.last_ms >= idle_ms:
        return END_IDLE
    if now - f.first_ms >= active_ms:
        return END_ACTIVE
    return 0


def pool_key(i: int, variant: tuple[int, int, int]) -> bytes:
    """A distinct, realistic-looking key for pool entry i."""
    port, proto, version = variant
    k = np.zeros(1, dtype=FLOW_RECORD)
    if version == 4:
        k["src_addr"][0, 10:12] = 0xFF
        k["dst_addr"][0, 10:12] = 0xFF
    k["src_addr"][0, 12:] = (10, 0, i // 256, i % 256)
    k["dst_addr"][0, 12:] = (192, 0, 2, 1 + i % 7)
    k["src_port"] = 40000 + i
    k["dst_port"] = port
    k["protocol"] = proto
    k["ip_version"] = version
    k["ifindex"] = 2
    return k.tobytes()[:KEY_SIZE]


def to_array(recs: list[Rec]) -> np.ndarray:
    out = np.zeros(len(recs), dtype=FLOW_RECORD)
    raw = out.view(np.uint8).reshape(len(recs), FLOW_RECORD.itemsize)
    for i, r in enumerate(recs):
        raw[i, :KEY_SIZE] = np.frombuffer(r.key, dtype=np.uint8)
        for name in VALUE_FIELDS:
            out[name][i] = getattr(r, name)
    return out


def from_array(records: np.ndarray) -> list[Rec]:
    assert records.dtype == FLOW_RECORD
    raw = np.ascontiguousarray(records).view(np.uint8).reshape(len(records), FLOW_RECORD.itemsize)
    return [Rec(raw[i, :KEY_SIZE].tobytes(), *(int(records[i][f]) for f in VALUE_FIELDS)) for i in range(len(records))]


def canonical(recs: list[Rec]) -> list[Rec]:
    return sorted(recs, key=lambda r: (r.key, r.first_ms, r.last_ms, r.packets, r.end_reason))


@dataclass
class Scenario:
    active_s: int
    idle_s: int
    capacity: int | None
    scans: list[tuple[int, list[Rec]]]  # (now_ms, records)


@st.composite
def scenarios(draw: st.DrawFn, unique_keys: bool = True, max_pool: int = 6) -> Scenario:
    variants = draw(st.lists(st.tuples(st.sampled_from([53, 80, 443]), st.sampled_from([6, 17]),
                                       st.sampled_from([4, 6])), min_size=1, max_size=max_pool))
    pool = [pool_key(i, v) for i, v in enumerate(variants)]
    now = draw(st.integers(100_000, 10**12))
    scans = []
    for _ in range(draw(st.integers(1, 7))):
        now += draw(st.sampled_from([0, 1, 500, 3_000, 10_000, 30_000]))
        if unique_keys:
            picks = draw(st.lists(st.sampled_from(range(len(pool))), unique=True, max_size=len(pool)))
        else:
            picks = draw(st.lists(st.sampled_from(range(len(pool))), max_size=2 * len(pool)))
        recs = []
        for i in picks:
            # Mostly stamped before `now`, now and then a little after it (wall clock stepped back).
            last = now - draw(st.sampled_from([-300, 0, 1, 999, 1_000, 4_999, 5_000, 20_000]))
            first = last - draw(st.sampled_from([0, 1, 2_000, 9_999, 10_000, 40_000]))
            packets = draw(st.integers(1, 10**6))
            ttl_a, ttl_b = draw(st.integers(1, 255)), draw(st.integers(1, 255))
            recs.append(Rec(pool[i], packets, packets * draw(st.integers(40, 1500)), first, last,
                            draw(st.sampled_from(FLAG_CHOICES)), draw(st.integers(0, 255)),
                            min(ttl_a, ttl_b), max(ttl_a, ttl_b),
                            draw(st.sampled_from([0, 0, 0, END_ACTIVE, END_FORCED]))))  # stray input reason
        scans.append((now, recs))
    return Scenario(draw(st.sampled_from([1, 5, 10, 60])), draw(st.sampled_from([1, 5, 15])),
                    draw(st.one_of(st.none(), st.integers(1, 4))), scans)


# -- single records, for the biflow tests -----------------------------------------------------------

A, B, C = (198, 18, 0, 1), (198, 18, 0, 2), (198, 19, 7, 9)
T0 = 1_700_000_000_000


def uni(src: tuple[int, ...], dst: tuple[int, ...], sport: int, dport: int, *, proto: int = 6, first: int = T0,
        last: int | None = None, packets: int = 1, flags: int = 0, ifindex: int = 2, ttl: int = 64,
        tos: int = 0) -> np.void:
    r = np.zeros(1, dtype=FLOW_RECORD)[0]
    for name, addr in (("src_addr", src), ("dst_addr", dst)):
        r[name][10:12] = 0xFF
        r[name][12:] = addr
    r["src_port"], r["dst_port"], r["protocol"], r["ip_version"] = sport, dport, proto, 4
    r["first_ms"], r["last_ms"] = first, first if last is None else last
    r["packets"], r["octets"], r["tcp_flags"], r["ifindex"] = packets, packets * 100, flags, ifindex
    r["min_ttl"] = r["max_ttl"] = ttl
    r["first_flags"] = flags & 0xFF
    r["tos"] = tos
    return r


def scan(*recs: np.void) -> Records:
    return np.array(list(recs), dtype=FLOW_RECORD)
