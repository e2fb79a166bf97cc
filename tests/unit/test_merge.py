"""exporter.merge: a page's slots -> flow records, and the fold of records of one flow.

A pure-Python reference fold is the oracle. Slots a program never wrote (packets 0) carry
garbage in every other field, so a conversion or fold that forgets to drop them shows up as a
mismatch; octet sums beyond 2**53 catch any detour through float.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.merge import TimeBase, merge, ns_to_epoch_ms, to_records
from exporter.records import FLOW_RECORD, KEY_SIZE
from xdp.layout import FLOW_KEY, FLOW_SLOT

MS = 1_000_000
OFFSET_NOW = 1_700_000_000_000_000_000  # a realistic wall-minus-monotonic offset (2023), in ns
BASE = TimeBase(start_jiffies=4_295_000_000, start_ns=1_000 * 10**9, end_jiffies=4_295_002_500,
                end_ns=1_010 * 10**9)   # 10 s at 250 Hz

written = st.fixed_dictionaries({
    "packets": st.integers(1, 2**40), "octets": st.integers(1, 2**58),
    "first": st.integers(-50, 3000), "span": st.integers(0, 3000),
    "flags": st.integers(0, 0x1FF), "tos": st.integers(0, 255), "ttl_a": st.integers(1, 255),
    "ttl_b": st.integers(1, 255), "first_flags": st.integers(0, 255),
})
unwritten = st.fixed_dictionaries({
    "packets": st.just(0), "octets": st.integers(0, 2**63), "first": st.integers(0, 2**40),
    "span": st.integers(0, 2**20), "flags": st.integers(0, 0xFFFF), "tos": st.integers(0, 255),
    "ttl_a": st.integers(0, 255), "ttl_b": st.integers(0, 255), "first_flags": st.integers(0, 255),
})


@st.composite
def pages(draw: st.DrawFn, max_keys: int = 6, max_slots: int = 16) -> np.ndarray:
    """Slots of a few keys (each key may have several: one per CPU, or a re-taken slot), in any order."""
    nkeys = draw(st.integers(1, max_keys))
    keys = [draw(st.binary(min_size=KEY_SIZE, max_size=KEY_SIZE)) for _ in range(nkeys)]
    n = draw(st.integers(0, max_slots))
    slots = np.zeros(n, dtype=FLOW_SLOT)
    for i in range(n):
        s = draw(st.one_of(written, written, unwritten))
        slots[i]["key"] = np.frombuffer(keys[draw(st.integers(0, nkeys - 1))], dtype=FLOW_KEY)[0]
        first = BASE.start_jiffies + s["first"] if s["packets"] else s["first"]
        slots[i]["value"] = (s["packets"], s["octets"], first, first + s["span"], s["flags"], s["tos"],
                             min(s["ttl_a"], s["ttl_b"]), max(s["ttl_a"], s["ttl_b"]), s["first_flags"], (0, 0))
    return slots


def ref_ms(jiffies: int, base: TimeBase, offset_ns: int) -> int:
    ns = base.start_ns + math.floor((jiffies - base.start_jiffies) * base.slope + 0.5)
    return (ns + offset_ns) // MS


def rank(flags: int) -> int:
    return flags | (0x100 if flags & 0x12 == 0x02 else 0)


def reference(slots: np.ndarray, base: TimeBase, offset_ns: int) -> dict[bytes, dict[str, int]]:
    out: dict[bytes, dict[str, int]] = {}
    for s in slots:
        v = s["value"]
        if int(v["packets"]) == 0:
            continue
        key = s["key"].tobytes()
        r = {"packets": int(v["packets"]), "octets": int(v["octets"]),
             "first_ms": ref_ms(int(v["first_seen"]), base, offset_ns),
             "last_ms": ref_ms(int(v["last_seen"]), base, offset_ns), "tcp_flags": int(v["tcp_flags"]),
             "tos": int(v["tos"]), "min_ttl": int(v["min_ttl"]), "max_ttl": int(v["max_ttl"]),
             "first_flags": int(v["first_flags"])}
        held = out.get(key)
        if held is None:
            out[key] = r
            continue
        if r["first_ms"] < held["first_ms"]:
            held["tos"], held["first_flags"] = r["tos"], r["first_flags"]
        elif r["first_ms"] == held["first_ms"]:
            held["tos"] = max(held["tos"], r["tos"])
            held["first_flags"] = max(held["first_flags"], r["first_flags"], key=rank)
        held["first_ms"] = min(held["first_ms"], r["first_ms"])
        held["last_ms"] = max(held["last_ms"], r["last_ms"])
        held["packets"] += r["packets"]
        held["octets"] += r["octets"]
        held["tcp_flags"] |= r["tcp_flags"]
        held["min_ttl"] = min(held["min_ttl"], r["min_ttl"])
        held["max_ttl"] = max(held["max_ttl"], r["max_ttl"])
    return out


def as_dict(records: np.ndarray) -> dict[bytes, dict[str, int]]:
    assert records.dtype == FLOW_RECORD
    out = {}
    for r in records:
        key = r.tobytes()[:KEY_SIZE]
        assert key not in out, "merge left a key twice"
        assert int(r["end_reason"]) == 0
        out[key] = {f: int(r[f]) for f in ("packets", "octets", "first_ms", "last_ms", "tcp_flags", "tos",
                                           "min_ttl", "max_ttl", "first_flags")}
    return out


@settings(max_examples=200, deadline=None)
@given(slots=pages(), offset_ns=st.integers(0, 2 * 10**18))
def test_merge_of_slots_matches_the_reference_fold(slots: np.ndarray, offset_ns: int) -> None:
    assert as_dict(merge(to_records(slots, BASE, offset_ns))) == reference(slots, BASE, offset_ns)


@settings(max_examples=150, deadline=None)
@given(slots=pages(), data=st.data())
def test_merge_does_not_depend_on_slot_order(slots: np.ndarray, data: st.DataObject) -> None:
    perm = data.draw(st.permutations(range(len(slots))))
    a = merge(to_records(slots, BASE, OFFSET_NOW))
    b = merge(to_records(slots[list(perm)], BASE, OFFSET_NOW))
    assert a.tobytes() == b.tobytes()   # same records, in the same (key) order


@settings(max_examples=100, deadline=None)
@given(slots=pages())
def test_unwritten_slots_dropped_and_packets_conserved(slots: np.ndarray) -> None:
    recs = to_records(slots, BASE, OFFSET_NOW)
    assert len(recs) == int((slots["value"]["packets"] > 0).sum())
    merged = merge(recs)
    assert (merged["packets"] > 0).all()
    assert int(merged["packets"].sum(dtype=np.uint64)) == sum(int(p) for p in slots["value"]["packets"])
    assert len({r.tobytes()[:KEY_SIZE] for r in merged}) == len(merged)


def test_a_page_of_unwritten_slots_gives_nothing() -> None:
    slots = np.zeros(3, dtype=FLOW_SLOT)
    slots["value"]["first_seen"] = 5
    slots["value"]["max_ttl"] = 64
    out = merge(to_records(slots, BASE, OFFSET_NOW))
    assert out.dtype == FLOW_RECORD and len(out) == 0
    assert len(merge(to_records(np.zeros(0, dtype=FLOW_SLOT), BASE, OFFSET_NOW))) == 0


def test_timebase_maps_the_interval_onto_the_monotonic_clock() -> None:
    j = np.array([BASE.start_jiffies, BASE.start_jiffies + 1, BASE.end_jiffies, BASE.start_jiffies - 2],
                 dtype=np.uint64)
    np.testing.assert_array_equal(BASE.to_ns(j), [1_000 * 10**9, 1_000 * 10**9 + 4 * MS, 1_010 * 10**9,
                                                  1_000 * 10**9 - 8 * MS])
    # A page open less than a tick: every stamp is its start.
    flat = TimeBase(7, 5 * 10**9, 7, 5 * 10**9 + 3 * MS)
    np.testing.assert_array_equal(flat.to_ns(np.array([7], dtype=np.uint64)), [5 * 10**9])


def test_ns_to_epoch_ms_floors_with_offset() -> None:
    mono = np.array([0, 999_999, 1_000_000, 123_456_789_012], dtype=np.int64)
    np.testing.assert_array_equal(ns_to_epoch_ms(mono, OFFSET_NOW), [(int(m) + OFFSET_NOW) // MS for m in mono])
    np.testing.assert_array_equal(ns_to_epoch_ms(mono, 0), [0, 0, 1, 123_456])
    # An offset that is not a whole number of ms must be added before flooring, not after.
    np.testing.assert_array_equal(ns_to_epoch_ms(np.array([600_000], dtype=np.int64), 500_000), [1])


def _slot(key: int, packets: int, first: int, last: int, flags: int, tos: int, min_ttl: int, max_ttl: int,
          first_flags: int = 0) -> np.void:
    s = np.zeros(1, dtype=FLOW_SLOT)[0]
    s["key"]["src_port"] = key
    s["value"] = (packets, packets * 100, BASE.start_jiffies + first, BASE.start_jiffies + last, flags, tos,
                  min_ttl, max_ttl, first_flags, (0, 0))
    return s


def test_slots_of_one_flow_on_three_cpus() -> None:
    slots = np.array([_slot(1, 0, 1, 900, 0, 0xFF, 1, 0),          # never written
                      _slot(1, 2, 10, 20, 0x02, 0x10, 60, 64),
                      _slot(1, 3, 15, 30, 0x11, 0x20, 50, 70)], dtype=FLOW_SLOT)
    (r,) = merge(to_records(slots, BASE, 0))
    assert (int(r["packets"]), int(r["octets"])) == (5, 500)
    assert (int(r["first_ms"]), int(r["last_ms"])) == (1_000_040, 1_000_120)   # 4 ms a jiffy
    assert (int(r["tcp_flags"]), int(r["tos"])) == (0x13, 0x10)
    assert (int(r["min_ttl"]), int(r["max_ttl"])) == (50, 70)


def test_a_bare_syn_is_the_first_packet_in_a_tie() -> None:
    slots = np.array([_slot(1, 1, 10, 10, 0x12, 0, 64, 64, first_flags=0x12),
                      _slot(1, 1, 10, 10, 0x02, 0, 64, 64, first_flags=0x02)], dtype=FLOW_SLOT)
    for order in (slots, slots[::-1].copy()):
        (r,) = merge(to_records(order, BASE, 0))
        assert int(r["first_flags"]) == 0x02
