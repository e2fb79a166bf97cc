"""exporter.merge.merge: fold (flows, cpus) per-CPU values into one record per flow.

A pure-Python reference fold is the oracle. Slots that saw no packets carry
garbage in the fields the fold must ignore (first/last seen, TTLs, ToS), so a
fold that forgets the `packets > 0` mask shows up as a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.layout import FLOW_KEY, FLOW_VALUE
from exporter.merge import merge, ns_to_epoch_ms
from exporter.records import FLOW_RECORD, KEY_SIZE

MS = 1_000_000
OFFSET_NOW = 1_700_000_000_000_000_000  # a realistic wall-minus-monotonic offset (2023), in ns


@dataclass
class Slot:
    packets: int
    octets: int
    first: int
    last: int
    flags: int
    tos: int
    min_ttl: int
    max_ttl: int


seen_slot = st.builds(
    lambda packets, octets, first, span, flags, tos, ttl_a, ttl_b: Slot(
        packets, octets, first, first + span, flags, tos, min(ttl_a, ttl_b), max(ttl_a, ttl_b)),
    packets=st.integers(1, 2**40),
    octets=st.integers(1, 2**58),  # sums beyond 2**53 catch any detour through float
    first=st.integers(0, 2**50),
    span=st.integers(0, 10**12),
    flags=st.integers(0, 0x1FF),
    tos=st.integers(0, 255),
    ttl_a=st.integers(1, 255),
    ttl_b=st.integers(1, 255),
)

# A CPU that never saw the flow: counters and flags are zero, everything else may be stale.
unseen_slot = st.builds(
    lambda first, last, tos, min_ttl: Slot(0, 0, first, last, 0, tos, min_ttl, 0),
    first=st.integers(0, 2**62), last=st.integers(0, 2**62), tos=st.integers(0, 255), min_ttl=st.integers(0, 255),
)


@st.composite
def per_cpu_maps(draw: st.DrawFn, max_flows: int = 10, max_cpus: int = 6) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(0, max_flows))
    cpus = draw(st.integers(1, max_cpus))
    keys = np.zeros(n, dtype=FLOW_KEY)
    raw = np.frombuffer(draw(st.binary(min_size=n * KEY_SIZE, max_size=n * KEY_SIZE)), dtype=np.uint8)
    keys.view(np.uint8)[:] = raw
    values = np.zeros((n, cpus), dtype=FLOW_VALUE)
    for i in range(n):
        for c in range(cpus):
            s = draw(st.one_of(seen_slot, unseen_slot))
            # first_flags: the slot's first packet's flags, drawn independently of the OR (merge does not care).
            values[i, c] = (s.packets, s.octets, s.first, s.last, s.flags, s.tos, s.min_ttl, s.max_ttl,
                            draw(st.integers(0, 255)), draw(st.lists(st.integers(0, 255), min_size=2, max_size=2)))
    return keys, values


def _first_flags_choices(earliest: list[np.void]) -> set[int]:
    flags = {int(v["first_flags"]) for v in earliest}
    bare_syn = {f for f in flags if f & 0x12 == 0x02}
    return bare_syn or flags


def reference(keys: np.ndarray, values: np.ndarray, offset_ns: int) -> list[dict[str, object]]:
    out = []
    for i in range(len(keys)):
        row = [values[i, c] for c in range(values.shape[1])]
        seen = [v for v in row if int(v["packets"]) > 0]
        if not seen:
            continue
        first = min(int(v["first_seen_ns"]) for v in seen)
        flags = 0
        for v in row:
            flags |= int(v["tcp_flags"])
        out.append({
            "key": keys[i].tobytes(),
            "packets": sum(int(v["packets"]) for v in row),
            "octets": sum(int(v["octets"]) for v in row),
            "first_ms": (first + offset_ns) // MS,
            "last_ms": (max(int(v["last_seen_ns"]) for v in seen) + offset_ns) // MS,
            "tcp_flags": flags,
            "tos_choices": {int(v["tos"]) for v in seen if int(v["first_seen_ns"]) == first},
            "first_flags_choices": _first_flags_choices([v for v in seen if int(v["first_seen_ns"]) == first]),
            "min_ttl": min(int(v["min_ttl"]) for v in seen),
            "max_ttl": max(int(v["max_ttl"]) for v in seen),
        })
    return out


def as_dicts(records: np.ndarray) -> list[dict[str, object]]:
    assert records.dtype == FLOW_RECORD
    return [{
        "key": r.tobytes()[:KEY_SIZE],
        **{f: int(r[f]) for f in ("packets", "octets", "first_ms", "last_ms", "tcp_flags", "tos", "min_ttl",
                                  "max_ttl", "end_reason", "first_flags")},
    } for r in records]


@settings(max_examples=150, deadline=None)
@given(maps=per_cpu_maps(), offset_ns=st.integers(0, 2 * 10**18))
def test_merge_matches_reference_fold(maps: tuple[np.ndarray, np.ndarray], offset_ns: int) -> None:
    keys, values = maps
    got = as_dicts(merge(keys, values, offset_ns))
    want = reference(keys, values, offset_ns)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["key"] == w["key"]
        for f in ("packets", "octets", "first_ms", "last_ms", "tcp_flags", "min_ttl"):
            assert g[f] == w[f], f
        assert g["tos"] in w["tos_choices"]  # type: ignore[operator]
        assert g["first_flags"] in w["first_flags_choices"]  # type: ignore[operator]
        assert g["end_reason"] == 0


@settings(max_examples=150, deadline=None)
@given(maps=per_cpu_maps(), data=st.data())
def test_merge_is_independent_of_cpu_order(maps: tuple[np.ndarray, np.ndarray], data: st.DataObject) -> None:
    keys, values = maps
    shuffled = values.copy()
    for i in range(len(values)):
        perm = data.draw(st.permutations(range(values.shape[1])))
        shuffled[i] = values[i, perm]
    a = merge(keys, values, OFFSET_NOW)
    b = merge(keys, shuffled, OFFSET_NOW)
    fields = [f for f in FLOW_RECORD.names or () if f not in ("tos", "first_flags")]
    assert len(a) == len(b)
    for f in fields:
        np.testing.assert_array_equal(a[f], b[f], err_msg=f)
    # ToS is defined by the earliest slot; compared only where that slot is unique
    # (ties: test_tos_on_first_seen_tie_is_independent_of_cpu_order).
    kept = values[values["packets"].sum(axis=1) > 0]
    first = np.where(kept["packets"] > 0, kept["first_seen_ns"], np.iinfo(np.uint64).max)
    unique_earliest = (first == first.min(axis=1, keepdims=True)).sum(axis=1) == 1
    np.testing.assert_array_equal(a["tos"][unique_earliest], b["tos"][unique_earliest])
    np.testing.assert_array_equal(a["first_flags"][unique_earliest], b["first_flags"][unique_earliest])


@settings(max_examples=100, deadline=None)
@given(maps=per_cpu_maps())
def test_unseen_entries_dropped_and_keys_carried(maps: tuple[np.ndarray, np.ndarray]) -> None:
    keys, values = maps
    out = merge(keys, values, OFFSET_NOW)
    alive = values["packets"].sum(axis=1) > 0
    assert len(out) == int(alive.sum())
    assert (out["packets"] > 0).all()
    for name in FLOW_KEY.names or ():
        np.testing.assert_array_equal(out[name], keys[alive][name])
    assert int(out["packets"].sum(dtype=np.uint64)) == sum(int(p) for p in values["packets"].ravel())


def test_all_zero_entries_give_nothing() -> None:
    keys = np.zeros(3, dtype=FLOW_KEY)
    values = np.zeros((3, 4), dtype=FLOW_VALUE)
    values["first_seen_ns"] = 5 * MS
    values["max_ttl"] = 64
    out = merge(keys, values, OFFSET_NOW)
    assert out.dtype == FLOW_RECORD and len(out) == 0
    assert len(merge(np.zeros(0, dtype=FLOW_KEY), np.zeros((0, 4), dtype=FLOW_VALUE), OFFSET_NOW)) == 0


def test_ns_to_epoch_ms_floors_with_offset() -> None:
    mono = np.array([0, 999_999, 1_000_000, 123_456_789_012], dtype=np.uint64)
    np.testing.assert_array_equal(ns_to_epoch_ms(mono, OFFSET_NOW),
                                  [(int(m) + OFFSET_NOW) // MS for m in mono])
    np.testing.assert_array_equal(ns_to_epoch_ms(mono, 0), [0, 0, 1, 123_456])
    # An offset that is not a whole number of ms must be added before flooring, not after.
    np.testing.assert_array_equal(ns_to_epoch_ms(np.array([600_000], dtype=np.uint64), 500_000), [1])


def test_first_and_last_use_only_slots_that_saw_packets() -> None:
    keys = np.zeros(1, dtype=FLOW_KEY)
    values = np.zeros((1, 3), dtype=FLOW_VALUE)
    values[0, 0] = (0, 0, 1 * MS, 900 * MS, 0, 0xFF, 1, 0, 0, (0, 0))           # stale, never saw the flow
    values[0, 1] = (2, 200, 10 * MS, 20 * MS, 0x02, 0x10, 60, 64, 0, (0, 0))
    values[0, 2] = (3, 300, 15 * MS, 30 * MS, 0x11, 0x20, 50, 70, 0, (0, 0))
    (r,) = merge(keys, values, 0)
    assert (int(r["packets"]), int(r["octets"])) == (5, 500)
    assert (int(r["first_ms"]), int(r["last_ms"])) == (10, 30)
    assert (int(r["tcp_flags"]), int(r["tos"])) == (0x13, 0x10)
    assert (int(r["min_ttl"]), int(r["max_ttl"])) == (50, 70)


def test_max_ttl_ignores_slots_without_packets() -> None:
    keys = np.zeros(1, dtype=FLOW_KEY)
    values = np.zeros((1, 2), dtype=FLOW_VALUE)
    values[0, 0] = (0, 0, 0, 0, 0, 0, 255, 255, 0, (0, 0))
    values[0, 1] = (1, 60, 10 * MS, 10 * MS, 0, 0, 64, 64, 0, (0, 0))
    (r,) = merge(keys, values, 0)
    assert int(r["max_ttl"]) == 64


def test_tos_on_first_seen_tie_is_independent_of_cpu_order() -> None:
    keys = np.zeros(1, dtype=FLOW_KEY)
    values = np.zeros((1, 2), dtype=FLOW_VALUE)
    values[0, 0] = (1, 60, 10 * MS, 10 * MS, 0, 0x10, 64, 64, 0, (0, 0))
    values[0, 1] = (1, 60, 10 * MS, 10 * MS, 0, 0x20, 64, 64, 0, (0, 0))
    a = merge(keys, values, 0)
    b = merge(keys, values[:, ::-1].copy(), 0)
    assert int(a["tos"][0]) == int(b["tos"][0])


@settings(max_examples=50, deadline=None)
@given(maps=per_cpu_maps())
def test_first_flags_only_when_asked(maps: tuple[np.ndarray, np.ndarray]) -> None:
    """Without first_flags the merge skips that field (0) and every other field is the same."""
    keys, values = maps
    full, lean = merge(keys, values, OFFSET_NOW), merge(keys, values, OFFSET_NOW, first_flags=False)
    assert not lean["first_flags"].any()
    for f in FLOW_RECORD.names or ():
        if f != "first_flags":
            np.testing.assert_array_equal(full[f], lean[f], err_msg=f)
