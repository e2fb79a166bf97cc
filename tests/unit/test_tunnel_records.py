"""Tunnel records (exporter/tunnels.py) and their templates: what is kept per flow, what is exported.

The store is held to its rules (the latest tunnelled slot per key wins, untunnelled and empty slots
change nothing, a flow's entry goes with it), split() to being a partition of the records it is
given, and the encoder's tunnel templates to the built-in collector's independent decoding, in the
compiled core and in the Python reference byte for byte.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectors.decoder import Decoder
from exporter.ipfix.encoder import Encoder
from exporter.records import FLOW_RECORD, key_view
from exporter.tunnels import TUNNEL_RECORD, TunnelStore
from tests.tunnels import mapped, tunnel_batch
from xdp.layout import FLOW_SLOT, TUNNEL_EXT, TUNNEL_GRE, TUNNEL_GRE_KEY, TUNNEL_VXLAN


def slots(ports: list[int], types: list[int], last_seen: list[int], packets: int = 1,
          outer: str = "198.18.0.1") -> tuple[np.ndarray, np.ndarray]:
    s = np.zeros(len(ports), dtype=FLOW_SLOT)
    s["key"]["src_port"] = ports
    s["key"]["ip_version"] = 4
    s["value"]["packets"] = packets
    s["value"]["last_seen"] = last_seen
    e = np.zeros(len(ports), dtype=TUNNEL_EXT)
    e["type"] = types
    e["tunnel_id"] = np.arange(len(ports)) + 100
    e["outer_ip_version"] = 4
    e["outer_src"] = np.frombuffer(mapped(outer), dtype=np.uint8)
    return s, e


def records_of(s: np.ndarray) -> np.ndarray:
    r = np.zeros(len(s), dtype=FLOW_RECORD)
    for name in s["key"].dtype.names:
        r[name] = s["key"][name]
    r["packets"] = s["value"]["packets"]
    return r


def test_the_latest_tunnelled_slot_of_a_key_is_kept_and_untunnelled_or_empty_slots_change_nothing() -> None:
    store = TunnelStore()
    # port 1: three slots (two CPUs, then a later one); port 2: untunnelled; port 3: a slot without packets.
    s, e = slots([1, 1, 1, 2, 3], [TUNNEL_VXLAN, TUNNEL_VXLAN, TUNNEL_VXLAN, 0, TUNNEL_GRE], [5, 9, 7, 9, 9])
    s["value"]["packets"][4] = 0
    assert store.note_windows([(s, e)]) == 3
    assert len(store) == 1
    plain, tun = store.split(records_of(s[[0, 3, 4]]))
    assert sorted(plain["src_port"].tolist()) == [2, 3]
    assert tun["tunnel_id"].tolist() == [101]          # the slot with last_seen 9
    assert len(store) == 0                              # its entry went with the flow
    again, none = store.split(records_of(s[[0]]))
    assert len(again) == 1 and len(none) == 0


def test_a_later_page_replaces_what_an_earlier_one_left() -> None:
    store = TunnelStore()
    s, e = slots([1], [TUNNEL_GRE_KEY], [100], outer="198.18.0.1")
    store.note_windows([(s, e)])
    s2, e2 = slots([1], [TUNNEL_GRE_KEY], [3], outer="198.18.0.9")   # jiffies are per page: order is by page
    store.note_windows([(s2, e2)])
    _, tun = store.split(records_of(s))
    assert bytes(tun["outer_src"][0]) == mapped("198.18.0.9")


def test_prune_drops_only_entries_whose_flow_the_table_does_not_hold() -> None:
    store = TunnelStore()
    s, e = slots([1, 2, 3], [TUNNEL_VXLAN] * 3, [1, 1, 1])
    store.note_windows([(s, e)])
    assert store.prune(records_of(s[[1]])) == 2
    assert len(store) == 1
    _, tun = store.split(records_of(s))
    assert tun["src_port"].tolist() == [2]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.sampled_from([0, 1, 2, 3, 4])), min_size=1, max_size=40),
       st.lists(st.integers(0, 25), max_size=30))
def test_split_is_a_partition_of_the_records(noted: list[tuple[int, int]], ended: list[int]) -> None:
    store = TunnelStore()
    ports, types = [p for p, _ in noted], [t for _, t in noted]
    s, e = slots(ports, types, list(range(len(ports))))
    store.note_windows([(s, e)])
    tunnelled = {p for p, t in noted if t}
    recs = records_of(slots(sorted(set(ended)), [0] * len(set(ended)), [0] * len(set(ended)))[0])
    plain, tun = store.split(recs)
    assert len(plain) + len(tun) == len(recs)
    assert set(tun["src_port"].tolist()) == tunnelled & set(ended)
    assert set(plain["src_port"].tolist()) == set(ended) - tunnelled
    assert bytes(key_view(tun[list(FLOW_RECORD.names)].astype(FLOW_RECORD))) == bytes(key_view(
        recs[np.isin(recs["src_port"], list(tunnelled))]))


@pytest.mark.parametrize("compiled", [False, True])
def test_the_tunnel_templates_carry_the_outer_addresses_technology_and_ids(compiled: bool) -> None:
    tun = tunnel_batch()
    msgs = Encoder(tunnels=True, compiled=compiled).encode(np.zeros(0, dtype=FLOW_RECORD), 1.0, tunnelled=tun)
    got = [r for m in msgs for r in Decoder().feed(m, "x").records]
    by_tid = {r.template_id: r.fields for r in got}
    assert sorted(by_tid) == [270, 271, 272, 273]
    vx, gre_key, geneve, gre = by_tid[270], by_tid[271], by_tid[272], by_tid[273]
    assert (vx["tunnelTechnology"], vx["layer2SegmentId"], vx["greKey"], vx["UPSTREAM_TUNNEL_ID"]) == \
        ("vxlan", 1 << 56 | 4242, 0, 4242)
    assert (vx["sourceIPv4Address"], vx["UNTUNNELED_IPV4_SRC_ADDR"], vx["UNTUNNELED_IPV4_DST_ADDR"],
            vx["packetDeltaCount"]) == ("198.19.0.1", "198.18.0.1", "198.18.0.2", 1)
    assert (gre_key["tunnelTechnology"], gre_key["layer2SegmentId"], gre_key["greKey"]) == ("gre", 0, 7)
    assert (gre_key["UNTUNNELED_IPV6_SRC_ADDR"], gre_key["UNTUNNELED_IPV6_DST_ADDR"]) == ("fd00::1", "fd00::2")
    assert (geneve["tunnelTechnology"], geneve["layer2SegmentId"], geneve["UPSTREAM_TUNNEL_ID"],
            geneve["sourceIPv6Address"], geneve["UNTUNNELED_IPV4_SRC_ADDR"]) == ("geneve", 0, 77, "fd00:7::1",
                                                                                "198.18.1.1")
    assert (gre["tunnelTechnology"], gre["greKey"], gre["UPSTREAM_TUNNEL_ID"], gre["octetDeltaCount"]) == \
        ("gre", 0, 0, 400)
    assert msgs.flows == [4]


def test_compiled_and_reference_encoders_agree_on_tunnel_records() -> None:
    plain = np.zeros(3, dtype=FLOW_RECORD)
    plain["ip_version"] = [4, 6, 4]
    plain["packets"] = 1
    a = Encoder(tunnels=True, compiled=True, mtu=1100).encode(plain, 5.0, tunnelled=tunnel_batch())
    b = Encoder(tunnels=True, compiled=False, mtu=1100).encode(plain, 5.0, tunnelled=tunnel_batch())
    assert list(a) == list(b) and a.flows == b.flows and len(a) > 1


def test_tunnelled_records_need_an_encoder_made_for_them() -> None:
    with pytest.raises(TypeError, match="tunnels=True"):
        Encoder().encode(np.zeros(0, dtype=FLOW_RECORD), 1.0, tunnelled=tunnel_batch())
    with pytest.raises(ValueError, match="do not combine"):
        Encoder(tunnels=True, biflow=True)
    assert TUNNEL_RECORD.names[:len(FLOW_RECORD.names)] == FLOW_RECORD.names

