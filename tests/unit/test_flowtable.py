"""exporter.flowtable.FlowTable against a dict-per-flow reference model.

Keys come from a small pool so flows repeat across scans; times advance in
steps comparable to the timeouts so every end reason happens. Besides exact
agreement with the model, the invariants are checked directly: no packet or
octet lost or duplicated (in total and per key), each end reason justified by
the rules, the capacity bound, and the table's own ordering. A deliberately
weak key hash (run as a second variant) forces hash collisions, so the
byte-wise paths that resolve them are exercised too.
"""

from __future__ import annotations

import ast
import inspect
import time
import timeit
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings

from exporter import flowtable
from exporter.flowtable import FlowTable, key_hash
from exporter.records import (
    END_ACTIVE,
    END_FORCED,
    END_IDLE,
    END_LACK_OF_RESOURCES,
    END_OF_FLOW,
    FLOW_RECORD,
    KEY_SIZE,
)
from tests.unit.tables import (
    ACK,
    FIN,
    RST,
    Model,
    Rec,
    Scenario,
    canonical,
    from_array,
    pool_key,
    rule_reason,
    scenarios,
    to_array,
)
from tools.synthetic import synthetic_flows, table_update_rate


def weak_hash(key_bytes: np.ndarray) -> np.ndarray:
    """Three buckets only: most distinct keys collide."""
    return (key_bytes.astype(np.uint64).sum(axis=1) % 3).astype(np.uint64)


@contextmanager
def hashed_by(fn: Callable[[np.ndarray], np.ndarray] | None) -> Iterator[None]:
    if fn is None:
        yield
        return
    with mock.patch.object(flowtable, "key_hash", fn):
        yield


def check_table_invariants(table: FlowTable, hash_fn: Callable[[np.ndarray], np.ndarray]) -> None:
    live = table.flows()
    keys = [r.key for r in from_array(live)]
    assert len(set(keys)) == len(keys) == len(table), "a key held twice"
    assert (live["end_reason"] == 0).all()
    raw = live.view(np.uint8).reshape(len(live), FLOW_RECORD.itemsize)
    hashes = hash_fn(raw[:, :KEY_SIZE])
    assert list(zip(hashes.tolist(), keys, strict=True)) == sorted(zip(hashes.tolist(), keys, strict=True))


def run_against_model(sc: Scenario, hash_fn: Callable[[np.ndarray], np.ndarray] | None) -> None:
    table = FlowTable(active_timeout_s=sc.active_s, idle_timeout_s=sc.idle_s, capacity=sc.capacity)
    model = Model(sc.active_s * 1000, sc.idle_s * 1000, sc.capacity)
    fed: Counter[bytes] = Counter()
    fed_octets: Counter[bytes] = Counter()
    out: Counter[bytes] = Counter()
    out_octets: Counter[bytes] = Counter()
    with hashed_by(hash_fn):
        for now, recs in sc.scans:
            arr = to_array(recs)
            before = arr.copy()
            expired = from_array(table.update(arr, now))
            np.testing.assert_array_equal(arr, before)  # the caller's scan is not modified
            assert canonical(expired) == canonical(model.update(recs, now))
            for r in recs:
                fed[r.key] += r.packets
                fed_octets[r.key] += r.octets
            survivors = from_array(table.flows())
            for r in expired:
                out[r.key] += r.packets
                out_octets[r.key] += r.octets
                rule = rule_reason(r, now, sc.active_s * 1000, sc.idle_s * 1000)
                if r.end_reason == END_LACK_OF_RESOURCES:
                    assert sc.capacity is not None and rule == 0
                    assert all(r.last_ms <= s.last_ms for s in survivors)
                else:
                    assert r.end_reason == rule != 0
            for s in survivors:
                assert rule_reason(s, now, sc.active_s * 1000, sc.idle_s * 1000) == 0
            assert canonical(survivors) == canonical(list(model.flows.values()))
            if sc.capacity is not None:
                assert len(table) <= sc.capacity
            assert sum(out.values()) + table.packets_held() == sum(fed.values())
            assert sum(out_octets.values()) + table.octets_held() == sum(fed_octets.values())
            check_table_invariants(table, hash_fn or key_hash)
        last = from_array(table.expire_all())
    assert len(table) == 0 and table.packets_held() == 0
    assert all(r.end_reason == END_FORCED for r in last)
    assert canonical([replace(r, end_reason=0) for r in last]) == canonical(list(model.flows.values()))
    for r in last:
        out[r.key] += r.packets
        out_octets[r.key] += r.octets
    assert out == fed
    assert out_octets == fed_octets


@pytest.mark.parametrize("hash_fn", [None, weak_hash], ids=["real-hash", "colliding-hash"])
@settings(max_examples=120, deadline=None)
@given(sc=scenarios())
def test_table_agrees_with_model_and_conserves(sc: Scenario, hash_fn: Callable[[np.ndarray], np.ndarray] | None,
                                               ) -> None:
    run_against_model(sc, hash_fn)


@pytest.mark.parametrize("hash_fn", [None, weak_hash], ids=["real-hash", "colliding-hash"])
@settings(max_examples=60, deadline=None)
@given(sc=scenarios(unique_keys=False))
def test_repeated_keys_within_a_scan_fold_in_input_order(
        sc: Scenario, hash_fn: Callable[[np.ndarray], np.ndarray] | None) -> None:
    run_against_model(sc, hash_fn)


@settings(max_examples=40, deadline=None)
@given(sc=scenarios(max_pool=12))
def test_larger_pools_with_collisions(sc: Scenario) -> None:
    run_against_model(sc, weak_hash)


def make(key: bytes, packets: int, first: int, last: int, flags: int = ACK, tos: int = 0) -> Rec:
    return Rec(key, packets, packets * 100, first, last, flags, tos, 64, 64)


K1, K2, K3 = (pool_key(i, (443, 6, 4)) for i in range(3))


def test_key_ended_then_seen_again_gives_two_records() -> None:
    table = FlowTable(active_timeout_s=60, idle_timeout_s=15)
    assert from_array(table.update(to_array([make(K1, 3, 1_000, 2_000)]), 2_000)) == []
    (ended,) = from_array(table.update(to_array([make(K1, 2, 3_000, 4_000, FIN | ACK)]), 4_000))
    assert (ended.packets, ended.first_ms, ended.end_reason) == (5, 1_000, END_OF_FLOW)
    assert len(table) == 0
    assert from_array(table.update(to_array([make(K1, 7, 5_000, 6_000)]), 6_000)) == []
    (again,) = from_array(table.expire_all())
    assert (again.packets, again.first_ms, again.tcp_flags, again.end_reason) == (7, 5_000, ACK, END_FORCED)


def test_reasons_priority_fin_over_idle_over_active() -> None:
    table = FlowTable(active_timeout_s=10, idle_timeout_s=5)
    recs = [make(K1, 1, 0, 1_000, RST | ACK), make(K2, 1, 0, 1_000), make(K3, 1, 0, 8_000)]
    got = {r.key: r.end_reason for r in from_array(table.update(to_array(recs), 10_000))}
    # K1 qualifies on all three rules, K2 on idle and active, K3 on active only.
    assert got == {K1: END_OF_FLOW, K2: END_IDLE, K3: END_ACTIVE}


def test_boundaries_are_inclusive_and_future_stamps_are_not_due() -> None:
    table = FlowTable(active_timeout_s=10, idle_timeout_s=5)
    assert from_array(table.update(to_array([make(K1, 1, 1_000, 1_000)]), 5_999)) == []
    assert [r.end_reason for r in from_array(table.update(to_array([]), 6_000))] == [END_IDLE]
    # Stamped after `now` (wall clock stepped back, or a caller passing 0): unsigned arithmetic would expire it.
    assert from_array(table.update(to_array([make(K2, 1, 50_000, 60_000)]), 0)) == []
    assert len(table) == 1


def test_tos_follows_earlier_first_and_the_higher_wins_a_tie() -> None:
    table = FlowTable()
    table.update(to_array([make(K1, 1, 5_000, 5_000, tos=0x10)]), 5_000)
    table.update(to_array([make(K1, 1, 4_000, 6_000, tos=0x30)]), 6_000)
    table.update(to_array([make(K1, 1, 4_000, 7_000, tos=0x20)]), 7_000)
    (r,) = from_array(table.flows())
    assert (r.tos, r.first_ms, r.last_ms, r.packets) == (0x30, 4_000, 7_000, 3)


def test_capacity_evicts_least_recently_seen_with_key_order_on_ties() -> None:
    table = FlowTable(active_timeout_s=600, idle_timeout_s=600, capacity=2)
    ks = [pool_key(i, (80, 6, 4)) for i in range(5)]
    recs = [make(ks[0], 1, 0, 300), make(ks[1], 1, 0, 100), make(ks[2], 1, 0, 200), make(ks[3], 1, 0, 100),
            make(ks[4], 1, 0, 400)]
    ended = from_array(table.update(to_array(recs), 1_000))
    assert sorted(r.key for r in ended) == sorted([ks[1], ks[2], ks[3]])
    assert all(r.end_reason == END_LACK_OF_RESOURCES for r in ended)
    table = FlowTable(active_timeout_s=600, idle_timeout_s=600, capacity=3)
    ended = from_array(table.update(to_array([make(k, 1, 0, 100) for k in reversed(ks)]), 1_000))
    assert sorted(r.key for r in ended) == sorted(ks)[:2]


def test_timeouts_are_applied_before_capacity() -> None:
    table = FlowTable(active_timeout_s=600, idle_timeout_s=600, capacity=1)
    ended = from_array(table.update(to_array([make(K1, 1, 0, 10, FIN), make(K2, 1, 0, 20)]), 1_000))
    assert [(r.key, r.end_reason) for r in ended] == [(K1, END_OF_FLOW)]
    assert len(table) == 1


def test_bulk_fold_matches_sums_and_keeps_order() -> None:
    rng = np.random.default_rng(7)
    flows = synthetic_flows(rng, 20_000)
    table = FlowTable(active_timeout_s=600, idle_timeout_s=600)
    flows["first_ms"] = flows["last_ms"] = 1_000
    table.update(flows[:15_000], 1_000)
    scan = rng.permutation(flows[5_000:])
    scan["first_ms"], scan["last_ms"] = 900, 2_000
    assert len(table.update(scan, 2_000)) == 0
    assert len(table) == 20_000
    assert table.packets_held() == int(flows["packets"].sum()) + int(flows["packets"][5_000:15_000].sum())
    live = table.flows()
    hashes = key_hash(live.view(np.uint8).reshape(len(live), -1)[:, :KEY_SIZE])
    assert (hashes[1:] >= hashes[:-1]).all()
    held_only = np.isin(live["src_addr"][:, 12:].copy().view(">u4").ravel(),
                        flows["src_addr"][:5_000, 12:].copy().view(">u4").ravel())
    assert int(held_only.sum()) == 5_000
    assert (live["first_ms"][held_only] == 1_000).all() and (live["last_ms"][held_only] == 1_000).all()
    assert (live["first_ms"][~held_only] == 900).all() and (live["last_ms"][~held_only] == 2_000).all()


def test_validation() -> None:
    for bad in (0, -1, float("nan"), float("inf"), True, "60"):
        with pytest.raises(ValueError, match="active_timeout_s"):
            FlowTable(active_timeout_s=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="idle_timeout_s"):
            FlowTable(idle_timeout_s=bad)  # type: ignore[arg-type]
    for cap in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="capacity"):
            FlowTable(capacity=cap)  # type: ignore[arg-type]
    assert FlowTable(0.5, 0.25, 10).idle_ms == 250
    with pytest.raises(TypeError):
        FlowTable().update(np.zeros(3, dtype=np.uint64), 0)
    with pytest.raises(ValueError, match="reason"):
        FlowTable().expire_all(0)


def test_module_never_reads_a_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    tree = ast.parse(inspect.getsource(flowtable))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"time", "datetime"}
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "FlowTable")
    names = {n.id for n in ast.walk(cls) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(cls) if isinstance(n, ast.Attribute)}
    assert not names & {"time", "timeit", "datetime", "default_timer", "perf_counter", "monotonic", "time_ns"}

    def no_clock() -> float:
        raise AssertionError("FlowTable read a clock")

    for name in ("time", "time_ns", "monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns", "process_time"):
        monkeypatch.setattr(time, name, no_clock)
    monkeypatch.setattr(timeit, "default_timer", no_clock)
    table = FlowTable(active_timeout_s=1, idle_timeout_s=1, capacity=1)
    table.update(to_array([make(K1, 1, 0, 10), make(K2, 1, 0, 20)]), 100)
    table.update(to_array([make(K1, 1, 0, 10_000)]), 10_000)
    table.expire_all()


def test_benchmark_helper_runs() -> None:
    assert table_update_rate(2_000, repeat=1) > 0
