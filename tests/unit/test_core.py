"""The compiled core (exporter/_core.c) against the numpy and Python references, record for record.

- CoreTable against FlowTable on the flow table's scenarios (every end reason, capacity, keys
  repeated within a scan), outputs compared as multisets per scan;
- Table.fold_slots against FlowTable.update(merge(to_records(slots))): the whole numpy path of a
  drained page, time conversion included;
- the encoder's compiled path against its numpy/Python path: the same messages, byte for byte,
  the same sequence numbers, per-message flow counts and totals, for uniflow and biflow records,
  with options, across MTUs and template refresh settings;
- send(): datagrams arrive whole and in order, and failures are reported per datagram;
- the byte layouts the C code assumes are the numpy dtypes'.
"""

from __future__ import annotations

import dataclasses
import errno
import socket

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter import core
from exporter.core import CoreTable
from exporter.flowtable import FlowTable
from exporter.ipfix.encoder import Encoder
from exporter.ipfix.options import ExporterState, Interface
from exporter.merge import TimeBase, merge, to_records
from exporter.records import BIFLOW_RECORD, FLOW_RECORD, KEY_SIZE
from exporter.transport import send_datagrams
from tests.unit.tables import Scenario, canonical, from_array, scenarios, to_array
from tools.bench import synthetic_slots
from tools.synthetic import random_records
from xdp.layout import FLOW_SLOT


def test_the_core_is_built() -> None:
    """`pip install .` (the README's setup) builds it; the service would fall back to numpy otherwise."""
    assert core.available(), core.IMPORT_ERROR


def test_layouts_match_the_dtypes() -> None:
    c = core.module()
    assert c.RECORD_SIZE == FLOW_RECORD.itemsize and c.SLOT_SIZE == FLOW_SLOT.itemsize
    for name, offset in c.RECORD_OFFSETS.items():
        assert offset == (0 if name == "key" else FLOW_RECORD.fields[name][1]), name  # type: ignore[index]
    value_at = FLOW_SLOT.fields["value"][1]  # type: ignore[index]
    value = FLOW_SLOT.fields["value"][0]  # type: ignore[index]
    for name, offset in c.SLOT_OFFSETS.items():
        assert offset == (0 if name == "key" else value_at + value.fields[name][1]), name


def run_both(sc: Scenario) -> None:
    ref = FlowTable(active_timeout_s=sc.active_s, idle_timeout_s=sc.idle_s, capacity=sc.capacity)
    got = CoreTable(active_timeout_s=sc.active_s, idle_timeout_s=sc.idle_s, capacity=sc.capacity)
    for now, recs in sc.scans:
        arr = to_array(recs)
        before = arr.copy()
        a = from_array(ref.update(arr.copy(), now))
        b = from_array(got.update(arr, now))
        np.testing.assert_array_equal(arr, before)   # the caller's scan is not modified
        assert canonical(b) == canonical(a)
        assert canonical(from_array(got.flows())) == canonical(from_array(ref.flows()))
        assert (len(got), got.packets_held(), got.octets_held()) == (len(ref), ref.packets_held(), ref.octets_held())
    assert canonical(from_array(got.expire_all())) == canonical(from_array(ref.expire_all()))
    assert len(got) == 0 and got.packets_held() == 0


@settings(max_examples=200, deadline=None)
@given(sc=scenarios())
def test_core_table_agrees_with_the_reference(sc: Scenario) -> None:
    run_both(sc)


@settings(max_examples=120, deadline=None)
@given(sc=scenarios(unique_keys=False, max_pool=10))
def test_core_table_agrees_with_keys_repeated_within_a_scan(sc: Scenario) -> None:
    run_both(sc)


def test_many_flows_grow_the_table_and_survive_partial_expiry() -> None:
    """Growth (index rebuilt), the few-removals path (swap-remove, backward shift) and the many-removals
    path (compaction), on 200K flows."""
    recs = random_records(200_000, seed=5)
    recs["end_reason"] = 0
    recs["tcp_flags"] &= np.uint16(0x1FA)   # no FIN/RST: only timeouts end flows here
    recs["src_port"] = np.arange(len(recs)) % 65536
    recs["dst_port"] = np.arange(len(recs)) // 65536
    recs["first_ms"] = recs["last_ms"] = 1_000_000
    ref, got = FlowTable(60, 15), CoreTable(60, 15)
    for r in (ref, got):
        r.update(recs.copy(), 1_000_000)
    late = recs[:1000].copy()
    late["last_ms"] = 1_020_000
    for r in (ref, got):
        r.update(late.copy(), 1_000_000)
    a, b = ref.update(recs[:0], 1_016_000), got.update(recs[:0], 1_016_000)   # all but 1000 idle out
    assert sorted(x.tobytes() for x in a) == sorted(x.tobytes() for x in b) and len(b) == 199_000
    assert sorted(x.tobytes() for x in ref.flows()) == sorted(x.tobytes() for x in got.flows())
    a, b = ref.update(late[:10].copy(), 1_050_000), got.update(late[:10].copy(), 1_050_000)
    assert sorted(x.tobytes() for x in a) == sorted(x.tobytes() for x in b)


def test_a_table_with_reserved_rows_grows_its_index() -> None:
    """With a capacity the rows are reserved once; the index must still grow with the flows held."""
    slots = synthetic_slots(50_000, 1, 1_000_000)
    got = CoreTable(60, 15, capacity=200_000)
    got._t.fold_slots(slots, 1_000_000, 10**12, 4e6, 0)
    recs = random_records(30_000, seed=9)
    recs["end_reason"] = 0
    recs["tcp_flags"] &= np.uint16(0x1FA)   # no FIN/RST: the reference's update would end them
    recs["first_ms"] = 990_000 + np.arange(len(recs))   # the slots' time (rows hold 32-bit ms from an epoch)
    recs["last_ms"] = recs["first_ms"] + 7
    got.fold(recs)
    ref = FlowTable(60, 15)
    ref.update(merge(to_records(slots, TimeBase(1_000_000, 10**12, 1_000_001, 10**12 + 4 * 10**6), 0)), 0)
    ref.update(recs, 0)
    assert len(got) == len(ref) == 80_000
    assert sorted(x.tobytes() for x in got.flows()) == sorted(x.tobytes() for x in ref.flows())


def test_times_weeks_apart_move_the_epoch_and_stay_exact() -> None:
    """Rows keep times as 32-bit ms from an epoch: a record weeks from it moves the epoch, and every
    time comes out as it went in (also across a wall clock stepped back by days)."""
    day = 86_400_000
    ref, got = FlowTable(10**6, 10**6), CoreTable(10**6, 10**6)
    base = 1_700_000_000_000
    for i, t in enumerate((base, base + 13 * day, base + 20 * day, base + 2 * day, base + 16 * day)):
        recs = random_records(50, seed=i)
        recs["tcp_flags"] &= np.uint16(0x1FA)
        recs["end_reason"] = 0
        recs["first_ms"] = t + np.arange(50)
        recs["last_ms"] = recs["first_ms"] + 1000
        for table in (ref, got):
            table.update(recs.copy(), 0)
        assert sorted(x.tobytes() for x in got.flows()) == sorted(x.tobytes() for x in ref.flows())


@st.composite
def slot_pages(draw: st.DrawFn) -> tuple[np.ndarray, TimeBase, int]:
    nkeys = draw(st.integers(1, 40))
    keys = np.frombuffer(draw(st.binary(min_size=nkeys * KEY_SIZE, max_size=nkeys * KEY_SIZE)), dtype=np.uint8)
    n = draw(st.integers(0, 120))
    start_j = draw(st.integers(0, 2**40))
    ticks = draw(st.integers(0, 20_000))
    start_ns = draw(st.integers(10**9, 10**15))
    base = TimeBase(start_j, start_ns, start_j + ticks, start_ns + ticks * draw(st.sampled_from([10**6, 4 * 10**6,
                                                                                                3_333_333])))
    slots = np.zeros(n, dtype=FLOW_SLOT)
    raw = slots.view(np.uint8).reshape(n, FLOW_SLOT.itemsize)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    which = rng.integers(0, nkeys, n)
    raw[:, :KEY_SIZE] = keys.reshape(nkeys, KEY_SIZE)[which]
    v = slots["value"]
    v["packets"] = rng.integers(0, 5, n) * rng.integers(1, 2**40, n)   # about one in five never written
    v["octets"] = rng.integers(0, 2**58, n)
    v["first_seen"] = start_j + rng.integers(-5, ticks + 5, n)
    v["last_seen"] = v["first_seen"] + rng.integers(0, 50, n).astype(np.uint64)
    v["tcp_flags"] = rng.integers(0, 0x200, n)
    v["tos"] = rng.integers(0, 4, n)           # few values: ties happen
    v["min_ttl"] = rng.integers(1, 128, n)
    v["max_ttl"] = v["min_ttl"] + rng.integers(0, 128, n).astype(np.uint8)
    v["first_flags"] = rng.choice(np.array([0x02, 0x12, 0x10, 0x18], dtype=np.uint8), n)
    return slots, base, draw(st.integers(0, 2 * 10**18))


@settings(max_examples=200, deadline=None)
@given(page=slot_pages(), held=st.booleans())
def test_fold_slots_is_the_numpy_path(page: tuple[np.ndarray, TimeBase, int], held: bool) -> None:
    slots, base, offset = page
    ref, got = FlowTable(60, 15), CoreTable(60, 15)
    if held and len(slots):   # a table already holding some of the flows
        first = merge(to_records(slots[: len(slots) // 2], base, offset))
        first["tcp_flags"] &= np.uint16(0x1FA)    # (no FIN/RST: they stay held)
        ref.update(first.copy(), 0)
        got.update(first.copy(), 0)
    records = merge(to_records(slots, base, offset))
    ended = ref.update(records, 0)   # now 0: only FIN/RST end flows
    n, packets, octets = got._t.fold_slots(slots, base.start_jiffies, base.start_ns, base.slope, offset)
    assert sorted(x.tobytes() for x in got.expire(0)) == sorted(x.tobytes() for x in ended)
    live = slots["value"]["packets"] > 0
    assert n == int(live.sum())
    assert packets == int(slots["value"]["packets"][live].sum(dtype=np.uint64))
    assert octets == int(slots["value"]["octets"][live].sum(dtype=np.uint64))
    assert sorted(x.tobytes() for x in got.flows()) == sorted(x.tobytes() for x in ref.flows())


_SEVENS = {f.name: 7 for f in dataclasses.fields(ExporterState) if f.type in ("int", "float")}
STATE = ExporterState(**{**_SEVENS, "sampling_probability": 0.25, "selected": (7, 6, 5),
                         "interfaces": (Interface(2, "eth0", "uplink"), Interface(7, "veth-a" * 10))})


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 3000), seed=st.integers(0, 1000), mtu=st.sampled_from([560, 600, 1400, 9000, 65535]),
       refresh=st.integers(1, 9), mode=st.sampled_from(["rfc", "nfdump"]), with_options=st.booleans(),
       v6=st.sampled_from([0.0, 0.2, 1.0]))
def test_compiled_encoder_is_the_reference(n: int, seed: int, mtu: int, refresh: int, mode: str,
                                           with_options: bool, v6: float) -> None:
    recs = random_records(n, seed=seed, ipv6_share=v6)
    a = Encoder(mtu=mtu, template_refresh_messages=refresh, sequence_mode=mode, compiled=False)  # type: ignore[arg-type]
    b = Encoder(mtu=mtu, template_refresh_messages=refresh, sequence_mode=mode, compiled=True)  # type: ignore[arg-type]
    for k, now in enumerate((1.7e9, 1.7e9 + 30, 1.7e9 + 200, 1.7e9 - 5)):   # refresh by time, and a clock step
        opts = STATE if with_options or k == 2 else None
        ma, mb = a.encode(recs, now, options=opts), b.encode(recs, now, options=opts)
        assert ma == mb
        assert (a.sequence, ma.flows, a.totals) == (b.sequence, mb.flows, b.totals)
    assert a.templates_message(1.7e9 + 500) == b.templates_message(1.7e9 + 500)


def as_biflows(uni: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """BIFLOW_RECORDs whose forward halves are `uni` and whose reverse halves are `uni` shuffled."""
    recs = np.zeros(len(uni), dtype=BIFLOW_RECORD)
    for name in BIFLOW_RECORD.names or ():
        if name in (FLOW_RECORD.names or ()):
            recs[name] = uni[name]
        elif name.startswith("r_"):
            recs[name] = uni[name[2:]][rng.permutation(len(uni))]
    return recs


def test_compiled_encoder_is_the_reference_for_biflows() -> None:
    rng = np.random.default_rng(2)
    recs = as_biflows(random_records(2000, seed=3), rng)
    recs["fwd_ifindex"], recs["rev_ifindex"] = 3, 4
    recs["fwd_direction"], recs["rev_direction"] = rng.integers(0, 2, len(recs)), rng.integers(0, 2, len(recs))
    recs["biflow_direction"] = 1
    a, b = Encoder(biflow=True, compiled=False), Encoder(biflow=True, compiled=True)
    assert a.encode(recs, 1.7e9, options=STATE) == b.encode(recs, 1.7e9, options=STATE)


def biflow_records(n: int, seed: int, one_sided: float) -> np.ndarray:
    """BIFLOW_RECORDs from random uniflows; a share of them saw one side only (sent as uniflows)."""
    rng = np.random.default_rng(seed)
    recs = as_biflows(random_records(n, seed=seed, ipv6_share=0.3), rng)
    recs["r_packets"][rng.random(len(recs)) < one_sided / 2] = 0
    recs["packets"][rng.random(len(recs)) < one_sided / 2] = 0
    return recs


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 2000), seed=st.integers(0, 1000), mtu=st.sampled_from([1000, 1400, 9000]),
       v6=st.sampled_from([0.0, 0.3, 1.0]), biflow=st.booleans(), with_options=st.booleans())
def test_each_message_carries_the_totals_its_bytes_decode_to(n: int, seed: int, mtu: int, v6: float,
                                                             biflow: bool, with_options: bool) -> None:
    # Summed while encoding, in C and in the numpy reference; flow_totals reads them back from the bytes.
    recs = biflow_records(n, seed, one_sided=0.4) if biflow else random_records(n, seed=seed, ipv6_share=v6)
    opts = STATE if with_options else None
    a, b = Encoder(mtu=mtu, biflow=biflow, compiled=False), Encoder(mtu=mtu, biflow=biflow, compiled=True)
    ma, mb = a.encode(recs, 1.7e9, options=opts), b.encode(recs, 1.7e9, options=opts)
    assert list(ma.totals) == list(mb.totals) == [a.flow_totals(m) for m in ma]
    assert [t.flows for t in mb.totals] == mb.flows and len(mb.totals) == len(mb)
    assert list(mb.totals[1:3]) == list(mb.totals)[1:3]


def test_compiled_encoder_refuses_an_unknown_ip_version_before_any_state_changes() -> None:
    recs = random_records(10)
    recs["ip_version"][3] = 5
    b = Encoder(compiled=True)
    with pytest.raises(ValueError, match="ip_version"):
        b.encode(recs, 1.7e9)
    assert b.sequence == 0 and b.totals.messages == 0


@pytest.fixture
def udp_pair() -> tuple[socket.socket, socket.socket]:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.connect(sink.getsockname())
    out.setblocking(False)
    yield sink, out
    sink.close()
    out.close()


def received(sink: socket.socket) -> list[bytes]:
    sink.settimeout(0.3)
    got = []
    try:
        while True:
            got.append(sink.recv(65535))
    except TimeoutError:
        return got


def test_send_delivers_every_datagram_whole_and_in_order(udp_pair: tuple[socket.socket, socket.socket]) -> None:
    sink, out = udp_pair
    # Runs of equal sizes (sent segmented) between odd ones, and a run longer than one segmented send.
    msgs = [bytes([i % 251]) * size for i, size in enumerate([1400] * 150 + [37] + [1400] * 3 + [900, 900, 12])]
    assert send_datagrams(out, msgs) == []
    assert received(sink) == msgs


def test_send_reports_each_failed_datagram_and_goes_on(udp_pair: tuple[socket.socket, socket.socket]) -> None:
    sink, out = udp_pair
    port = sink.getsockname()[1]
    sink.close()
    out.send(b"x")   # nobody listens: the ICMP error makes the next send fail with ECONNREFUSED
    msgs = [b"a" * 100] * 5
    refused: list[int] = []
    failures = send_datagrams(out, msgs, refused=refused)
    # The refusal answers the earlier datagram: the one it fell on is sent again; whatever the
    # later refusals hit (the port stays closed) is reported, by index, and the rest still go.
    assert refused and refused[0] == 0
    assert all(e.errno == errno.ECONNREFUSED for _, e in failures)
    assert all(i < len(msgs) for i, _ in failures)
    assert port


def test_message_totals_wrap_alike_in_both_encoders() -> None:
    """Counters near 2^64 in IPv4 and IPv6 groups of one message: both encoders sum in one uint64."""
    recs = random_records(8, seed=1, ipv6_share=0.5)
    recs["packets"] = 1 << 63
    recs["octets"] = (1 << 64) - 1
    a, b = Encoder(compiled=False).encode(recs, 1.7e9), Encoder(compiled=True).encode(recs, 1.7e9)
    assert [(t.packets, t.octets) for t in a.totals] == [(t.packets, t.octets) for t in b.totals]
