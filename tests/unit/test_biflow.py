"""Biflow table (exporter/biflow.py) and biflow encoding, without a kernel.

Properties: packets and octets are conserved whatever the scans hold; the two
directions of a conversation end up in one record; the initiator follows the
rules of the module docstring. Then the records through the encoder and the
built-in collector's decoder, with the RFC 5103 reverse elements by name.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectors.decoder import Decoder
from exporter.biflow import BiflowTable
from exporter.ipfix import Encoder, ExporterState
from exporter.records import (
    BIFLOW_ARBITRARY,
    BIFLOW_INITIATOR,
    BIFLOW_RECORD,
    END_IDLE,
    END_OF_FLOW,
    FLOW_RECORD,
    Records,
)
from tests.unit.tables import ACK, FIN, SYN, T0, A, B, C, scan, uni


def addr(rec: np.void, name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in rec[name][12:])


def test_a_handshake_in_one_scan_is_one_record_initiator_first() -> None:
    t = BiflowTable(60, 15)
    t.update(scan(uni(B, A, 80, 40000, first=T0 + 1, flags=SYN | ACK, packets=5, ifindex=3, ttl=60, tos=8),
                  uni(A, B, 40000, 80, flags=SYN, packets=3)), T0 + 2)
    (r,) = t.flows()
    assert (addr(r, "src_addr"), int(r["src_port"]), int(r["dst_port"])) == (A, 40000, 80)
    assert (int(r["packets"]), int(r["r_packets"]), int(r["octets"]), int(r["r_octets"])) == (3, 5, 300, 500)
    assert (int(r["fwd_ifindex"]), int(r["rev_ifindex"]), int(r["ifindex"])) == (2, 3, 0)
    assert (int(r["first_ms"]), int(r["r_first_ms"]), int(r["r_min_ttl"]), int(r["r_tos"])) == (T0, T0 + 1, 60, 8)
    assert int(r["biflow_direction"]) == BIFLOW_INITIATOR


def test_same_millisecond_the_bare_syn_initiates() -> None:
    t = BiflowTable(60, 15)
    t.update(scan(uni(B, A, 80, 40000, flags=SYN | ACK), uni(A, B, 40000, 80, flags=SYN)), T0)
    (r,) = t.flows()
    assert addr(r, "src_addr") == A and int(r["biflow_direction"]) == BIFLOW_INITIATOR


def test_same_millisecond_icmp_request_initiates() -> None:
    t = BiflowTable(60, 15)
    t.update(scan(uni(B, A, 0, 0x0000, proto=1), uni(A, B, 0, 0x0800, proto=1, packets=4)), T0)
    (r,) = t.flows()
    assert addr(r, "src_addr") == A and int(r["dst_port"]) == 0x0800
    assert (int(r["packets"]), int(r["r_packets"]), int(r["biflow_direction"])) == (4, 1, BIFLOW_INITIATOR)


def test_same_millisecond_without_clues_the_higher_source_port_is_a_guess() -> None:
    t = BiflowTable(60, 15)
    t.update(scan(uni(B, A, 53, 51000, proto=17), uni(A, B, 51000, 53, proto=17)), T0)
    (r,) = t.flows()
    assert int(r["src_port"]) == 51000 and int(r["biflow_direction"]) == BIFLOW_ARBITRARY


def test_a_lone_side_is_confirmed_when_its_answer_comes_later() -> None:
    t = BiflowTable(60, 15)
    t.update(scan(uni(A, B, 40000, 53, proto=17)), T0)
    assert int(t.flows()[0]["biflow_direction"]) == BIFLOW_ARBITRARY
    t.update(scan(uni(B, A, 53, 40000, proto=17, first=T0 + 5)), T0 + 10)
    (r,) = t.flows()
    assert addr(r, "src_addr") == A and (int(r["packets"]), int(r["r_packets"])) == (1, 1)
    assert int(r["biflow_direction"]) == BIFLOW_INITIATOR


def test_a_lone_bare_syn_or_echo_request_initiates_at_once() -> None:
    t = BiflowTable(60, 15)
    t.update(scan(uni(A, B, 40000, 80, flags=SYN), uni(A, C, 0, 0x0800, proto=1),
                  uni(B, C, 40001, 80, flags=SYN | ACK)), T0)
    got = {(addr(r, "dst_addr"), int(r["dst_port"])): int(r["biflow_direction"]) for r in t.flows()}
    assert got == {(B, 80): BIFLOW_INITIATOR, (C, 0x0800): BIFLOW_INITIATOR, (C, 80): BIFLOW_ARBITRARY}


def test_held_orientation_wins_over_later_scans() -> None:
    """Once a conversation is held, its sides do not swap, whatever a later scan's timing says."""
    t = BiflowTable(60, 15)
    t.update(scan(uni(A, B, 40000, 80, first=T0)), T0)
    t.update(scan(uni(B, A, 80, 40000, first=T0 + 100), uni(A, B, 40000, 80, first=T0 + 200)), T0 + 300)
    (r,) = t.flows()
    assert addr(r, "src_addr") == A and (int(r["packets"]), int(r["r_packets"])) == (2, 1)


def test_ingress_only_pairs_across_interfaces_per_interface_does_not() -> None:
    both = scan(uni(A, B, 40000, 80, ifindex=2), uni(B, A, 80, 40000, first=T0 + 1, ifindex=3))
    gateway = BiflowTable(60, 15)
    gateway.update(both, T0)
    assert len(gateway) == 1
    per_if = BiflowTable(60, 15, per_interface=True)
    per_if.update(both, T0)
    assert len(per_if) == 2
    per_if.update(scan(uni(B, A, 80, 40000, first=T0 + 2, ifindex=2)), T0 + 3)
    assert len(per_if) == 2
    r = next(x for x in per_if.flows() if int(x["ifindex"]) == 2)
    assert (int(r["fwd_ifindex"]), int(r["rev_ifindex"]), int(r["r_packets"])) == (2, 2, 1)


def test_fin_from_either_side_ends_and_idle_needs_both_sides_quiet() -> None:
    t = BiflowTable(60, 15)
    t.update(scan(uni(A, B, 40000, 80, first=T0), uni(B, A, 80, 40000, first=T0 + 1)), T0 + 1)
    # The forward side went quiet at T0, the reverse is still talking: not idle.
    assert len(t.update(scan(uni(B, A, 80, 40000, first=T0 + 10_000)), T0 + 15_500)) == 0
    (r,) = t.update(scan(), T0 + 25_000)
    assert int(r["end_reason"]) == END_IDLE and int(r["r_packets"]) == 2
    t.update(scan(uni(A, B, 40001, 80, first=T0 + 30_000)), T0 + 30_000)
    (r,) = t.update(scan(uni(B, A, 80, 40001, first=T0 + 30_001, flags=FIN | ACK)), T0 + 30_001)
    assert int(r["end_reason"]) == END_OF_FLOW and int(r["r_tcp_flags"]) == FIN | ACK


def test_an_empty_side_is_exported_as_zeros() -> None:
    t = BiflowTable(60, 15)
    t.update(scan(uni(A, B, 40000, 80)), T0)
    (r,) = t.expire_all()
    assert (int(r["r_packets"]), int(r["r_first_ms"]), int(r["r_last_ms"]), int(r["r_min_ttl"])) == (0, 0, 0, 0)
    assert int(r["rev_ifindex"]) == 0 and r.dtype == BIFLOW_RECORD


def _conversation(draw: st.DrawFn) -> list[np.void]:
    hosts = [A, B, C]
    i, j = draw(st.permutations(range(3)))[:2]
    sport = draw(st.sampled_from([40000, 40001, 53]))
    dport = draw(st.sampled_from([80, 53]))
    proto = draw(st.sampled_from([6, 17]))
    out = []
    for _ in range(draw(st.integers(1, 4))):
        fwd = draw(st.booleans())
        s, d = (hosts[i], hosts[j]) if fwd else (hosts[j], hosts[i])
        sp, dp = (sport, dport) if fwd else (dport, sport)
        out.append(uni(s, d, sp, dp, proto=proto, first=T0 + draw(st.integers(0, 3)),
                       packets=draw(st.integers(1, 1000)), flags=draw(st.sampled_from([0, SYN, SYN | ACK, ACK])),
                       ifindex=draw(st.integers(2, 4))))
    return out


@settings(max_examples=int(os.environ.get("XDPFLOW_FUZZ_EXAMPLES", "200")), deadline=None)
@given(data=st.data())
def test_conservation_and_complete_pairing(data: st.DataObject) -> None:
    """Whatever the scans hold: nothing lost or doubled, and one record per conversation at the end."""
    convs = data.draw(st.lists(st.composite(_conversation)(), min_size=1, max_size=6))
    uniflows = [u for c in convs for u in c]
    scans = data.draw(st.integers(1, 3))
    cut = sorted(data.draw(st.lists(st.integers(0, len(uniflows)), min_size=scans - 1, max_size=scans - 1)))
    order = data.draw(st.permutations(uniflows))
    t = BiflowTable(3600, 3600)
    out = []
    bounds = [0, *cut, len(order)]
    for k in range(scans):
        out.append(t.update(scan(*order[bounds[k]:bounds[k + 1]]) if bounds[k + 1] > bounds[k]
                            else np.zeros(0, dtype=FLOW_RECORD), T0 + 10))
    out.append(t.expire_all())
    recs = np.concatenate(out)
    assert int(recs["packets"].sum() + recs["r_packets"].sum()) == sum(int(u["packets"]) for u in uniflows)
    assert int(recs["octets"].sum() + recs["r_octets"].sum()) == sum(int(u["octets"]) for u in uniflows)

    def conversation(r: np.void) -> tuple[object, ...]:
        ends = sorted([(addr(r, "src_addr"), int(r["src_port"])), (addr(r, "dst_addr"), int(r["dst_port"]))])
        return (*ends, int(r["protocol"]))

    counts = Counter(conversation(r) for r in recs)
    assert max(counts.values()) == 1, counts
    assert all(int(r["packets"]) > 0 for r in recs), "every record has its initiator's side"


def test_biflow_records_through_the_encoder_and_the_builtin_decoder() -> None:
    t = BiflowTable(60, 15)
    t.update(scan(uni(A, B, 40000, 80, flags=SYN, packets=3),
                  uni(B, A, 80, 40000, first=T0 + 7, flags=SYN | ACK, packets=5, ifindex=3, ttl=61, tos=4)), T0 + 7)
    recs = t.expire_all()
    enc = Encoder(biflow=True)
    msgs = enc.encode(recs, T0 / 1000)
    assert enc.flow_totals(msgs[0]).packets == 8 and enc.flow_totals(msgs[0]).octets == 800
    dec = Decoder()
    decoded = [r for m in msgs for r in dec.feed(m, "x").records if not r.is_options]
    assert [r.template_id for r in decoded] == [262]
    f = decoded[0].fields
    want = {"sourceIPv4Address": "198.18.0.1", "sourceTransportPort": 40000, "packetDeltaCount": 3,
            "reversePacketDeltaCount": 5, "reverseOctetDeltaCount": 500, "ingressInterface": 2,
            "reverseIngressInterface": 3, "reverseFlowStartMilliseconds": T0 + 7, "reverseTcpControlBits": SYN | ACK,
            "reverseMinimumTTL": 61, "reverseIpClassOfService": 4, "biflowDirection": BIFLOW_INITIATOR}
    assert {k: f[k] for k in want} == want


def test_biflow_encoder_refuses_uniflow_records() -> None:
    with pytest.raises(TypeError, match="BIFLOW_RECORD"):
        Encoder(biflow=True).encode(scan(uni(A, B, 1, 2)), T0 / 1000)


def _decoded_flows(recs: Records, **kwargs: bool) -> tuple[Encoder, Decoder, list[dict[str, object]]]:
    enc = Encoder(biflow=True, **kwargs)
    dec = Decoder()
    out = [(r.template_id, r.fields) for m in enc.encode(recs, T0 / 1000) for r in dec.feed(m, "x").records
           if not r.is_options]
    return enc, dec, [{"template": tid, **fields} for tid, fields in out]


def test_one_sided_biflows_go_out_under_the_uniflow_templates() -> None:
    """A conversation without an answer is a uniflow: no reverse fields, no 1970 reverse times."""
    t = BiflowTable(60, 15)
    t.update(scan(uni(A, B, 40000, 80, packets=3, ifindex=5),
                  uni(A, C, 5353, 53, proto=17, packets=2, first=T0 + 1),
                  uni(C, A, 53, 5353, proto=17, packets=1, first=T0 + 2)), T0 + 2)
    enc, _, got = _decoded_flows(t.expire_all())
    by_template = Counter(int(str(r["template"])) for r in got)
    assert by_template == {256: 1, 262: 1}
    lone = next(r for r in got if r["template"] == 256)
    assert not any(k.startswith("reverse") for k in lone)
    assert (lone["sourceIPv4Address"], lone["destinationIPv4Address"], lone["sourceTransportPort"],
            lone["packetDeltaCount"], lone["ingressInterface"], lone["flowStartMilliseconds"]) == \
        ("198.18.0.1", "198.18.0.2", 40000, 3, 5, T0)
    assert {t.template_id for t in enc.data_templates} == {256, 257, 262, 263}


def _reverse_only(proto: int, sport: int, dport: int) -> Records:
    """A biflow whose forward side is empty (the table never makes one: the encoder must cope anyway)."""
    recs = np.zeros(1, dtype=BIFLOW_RECORD)
    r = recs[0]
    for name, a in (("src_addr", A), ("dst_addr", B)):
        r[name][10:12] = 0xFF
        r[name][12:] = a
    r["protocol"], r["ip_version"], r["src_port"], r["dst_port"] = proto, 4, sport, dport
    r["r_packets"], r["r_octets"], r["r_first_ms"], r["r_last_ms"] = 2, 168, T0, T0 + 5
    r["rev_ifindex"], r["end_reason"] = 3, END_IDLE
    return recs


def test_a_reverse_only_biflow_is_the_reverse_uniflow() -> None:
    _, _, got = _decoded_flows(_reverse_only(6, 40000, 80))
    (r,) = got
    assert r["template"] == 256
    assert (r["sourceIPv4Address"], r["destinationIPv4Address"], r["sourceTransportPort"],
            r["destinationTransportPort"], r["packetDeltaCount"], r["ingressInterface"], r["flowEndMilliseconds"],
            r["flowEndReason"]) == ("198.18.0.2", "198.18.0.1", 80, 40000, 2, 3, T0 + 5, END_IDLE)


def test_icmp_reverse_only_biflow_carries_the_reply_type() -> None:
    _, _, got = _decoded_flows(_reverse_only(1, 0, 0x0800))  # the forward side's echo request
    assert got[0]["template"] == 256 and got[0]["icmpTypeCodeIPv4"] == 0x0000  # so the reply's: echo reply
    assert got[0]["sourceIPv4Address"] == "198.18.0.2"


@pytest.mark.parametrize("per_interface", [False, True])
def test_biflow_flow_keys_are_the_pairing_keys(per_interface: bool) -> None:
    """flowKeyIndicator of 262/263 names what pairing_keys() compares: never the hook (flowDirection),
    the interfaces only when biflows pair per interface (egress metering)."""
    enc = Encoder(biflow=True, per_interface=per_interface)
    dec = Decoder()
    records = [r for m in enc.encode_options(_state(), T0 / 1000) for r in dec.feed(m, "x").records]
    indicators = {r.fields["templateId"]: int(str(r.fields["flowKeyIndicator"])) for r in records
                  if r.template_id == 259}
    templates = dec.templates("x", 0)
    for tid, family in ((262, "IPv4"), (263, "IPv6")):
        names = [f.name for f in templates[tid].fields]
        keys = {n for i, n in enumerate(names) if indicators[tid] >> i & 1}
        want = {f"source{family}Address", f"destination{family}Address", "sourceTransportPort",
                "destinationTransportPort", "protocolIdentifier", "vlanId", f"icmpTypeCode{family}"}
        if per_interface:
            want |= {"ingressInterface", "egressInterface"}
        assert keys == want
    assert indicators[256] >> 7 & 1, "uniflow templates keep flowDirection as a key"


def _state() -> ExporterState:
    return ExporterState(not_sent_flows=0, not_sent_packets=0, not_sent_octets=0, exported_messages=0,
                         exported_flows=0, exported_octets=0, observed_packets=0, observed_octets=0,
                         ignored_packets=0, ignored_octets=0, active_timeout_s=60, idle_timeout_s=15,
                         system_init_ms=T0)
