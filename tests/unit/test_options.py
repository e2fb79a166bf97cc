"""Options templates and records (RFC 7011 section 4) and the two sequence-number dialects.

Values are checked through two independent decoders: the `ipfix` package and
the built-in collector's decoder (collectors.decoder, written separately),
which also checks sequence numbers with count_options on and off.
"""

from __future__ import annotations

import struct
from datetime import datetime, timedelta
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import ipfix.ie
import ipfix.message
import ipfix.template
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collectors.decoder import Decoder
from exporter.ipfix import (
    CONFIG_TEMPLATE_ID,
    FLOW_KEYS_TEMPLATE_ID,
    FLOW_V4,
    FLOW_V6,
    METERING_TEMPLATE_ID,
    RELIABILITY_TEMPLATE_ID,
    Encoder,
    ExporterState,
    FlowTotals,
    SequenceMode,
    Template,
)
from exporter.ipfix.options import Interface
from exporter.records import FLOW_RECORD
from tests.unit.wire import Message
from tests.unit.wire import parse as parse_default
from tools.synthetic import random_records

SETTINGS = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
U32 = 1 << 32
U64 = 1 << 64
NOW = 1_700_000_000.0
EPOCH = datetime(1970, 1, 1)
MTU_MIN = 560  # a little above the smallest MTU the encoder accepts (it holds every template and one record)
INTERFACES = 264
OPTIONS_IDS = [CONFIG_TEMPLATE_ID, FLOW_KEYS_TEMPLATE_ID, METERING_TEMPLATE_ID, RELIABILITY_TEMPLATE_ID, INTERFACES,
               265, 266, 267, 268]
# Records per options run without interfaces: one per template, two flow-key and two property-selector records.
OPTIONS_PER_STATE = 10

# Oracles, restated from RFC 7011 section 4, RFC 5476 6.5 and the IANA registry rather than read from the encoder.
IANA_IDS = {
    "observationDomainId": 149, "exportingProcessId": 144, "templateId": 145, "samplingInterval": 34,
    "samplingPacketInterval": 305, "flowActiveTimeout": 36, "flowIdleTimeout": 37, "systemInitTimeMilliseconds": 160,
    "exportedMessageTotalCount": 41, "exportedFlowRecordTotalCount": 42, "exportedOctetTotalCount": 40,
    "packetTotalCount": 86, "octetTotalCount": 85, "ignoredPacketTotalCount": 164, "ignoredOctetTotalCount": 165,
    "notSentFlowTotalCount": 166, "notSentPacketTotalCount": 167, "notSentOctetTotalCount": 168,
    "flowKeyIndicator": 173, "exporterIPv4Address": 130, "exporterIPv6Address": 131,
    "observationTimeMilliseconds": 323, "ingressInterface": 10, "interfaceName": 82, "interfaceDescription": 83,
    "selectionSequenceId": 301, "selectorId": 302, "selectorAlgorithm": 304, "samplingProbability": 311,
    "selectorIdTotalPktsObserved": 318, "selectorIdTotalPktsSelected": 319,
}
SCOPES = {CONFIG_TEMPLATE_ID: "observationDomainId", FLOW_KEYS_TEMPLATE_ID: "templateId",
          METERING_TEMPLATE_ID: "observationDomainId", RELIABILITY_TEMPLATE_ID: "exportingProcessId",
          INTERFACES: "ingressInterface", 265: "selectionSequenceId", 266: "selectorId", 267: "selectorId",
          268: "selectionSequenceId"}
# The flow key of xdp/layout.py as the data templates name it; ICMP type/code is carried in dst_port.
FLOW_KEY_FIELDS = {
    family: {f"source{family}Address", f"destination{family}Address", "sourceTransportPort",
             "destinationTransportPort", "protocolIdentifier", "ingressInterface", "egressInterface", "vlanId",
             f"icmpTypeCode{family}", "flowDirection"}
    for family in ("IPv4", "IPv6")
}

u64 = st.integers(0, U64 - 1)
timeouts = st.integers(0, 65535) | st.floats(0, 65535.49)
addresses = st.one_of(
    st.none(),
    st.builds(IPv4Address, st.integers(0, U32 - 1)),
    st.builds(IPv6Address, st.integers(0, (1 << 128) - 1)),
    st.builds(lambda n: f"::ffff:{IPv4Address(n)}", st.integers(0, U32 - 1)),
)
ms = st.integers(0, 250_000_000_000_000)  # the ipfix decoder makes datetimes: stay before 9999
selection = st.lists(u64, min_size=4, max_size=4).map(lambda v: sorted(v, reverse=True))
names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=16).filter(
    lambda t: len(t.encode()) <= 64)
descriptions = names | st.text("ab-_ .", min_size=250, max_size=256)  # 250+: the 3-octet length form
interfaces = st.lists(st.builds(Interface, st.integers(0, U32 - 1), names, descriptions),
                      max_size=3, unique_by=lambda i: i.ifindex).map(tuple)


@st.composite
def states(draw: st.DrawFn, with_interfaces: bool = False) -> ExporterState:
    chain = draw(selection)
    return ExporterState(
        not_sent_flows=draw(u64), not_sent_packets=draw(u64), not_sent_octets=draw(u64),
        exported_messages=draw(u64), exported_flows=draw(u64), exported_octets=draw(u64),
        observed_packets=draw(u64), observed_octets=draw(u64), ignored_packets=draw(u64), ignored_octets=draw(u64),
        active_timeout_s=draw(timeouts), idle_timeout_s=draw(timeouts), system_init_ms=draw(ms),
        sampling_interval=draw(st.integers(1, U32 - 1)), sampling_probability=draw(st.floats(1e-9, 1.0)),
        ignored_first_ms=draw(ms), ignored_last_ms=draw(ms), not_sent_first_ms=draw(ms), not_sent_last_ms=draw(ms),
        frames=chain[0], selected=(chain[1], chain[2], chain[3]),
        interfaces=draw(interfaces) if with_interfaces else (),
    )


def parse(raw: bytes, enc: Encoder | None = None) -> Message:
    """Wire checks with the record lengths of `enc`'s templates (the exporter address changes one)."""
    return parse_default(raw, None if enc is None else
                         {t.template_id: t.record_length for t in enc.templates if not t.variable})


def state(**overrides: Any) -> ExporterState:
    values: dict[str, Any] = {
        "not_sent_flows": 1, "not_sent_packets": 2, "not_sent_octets": 3, "exported_messages": 4,
        "exported_flows": 5, "exported_octets": 6, "observed_packets": 700, "observed_octets": 80_000,
        "ignored_packets": 9, "ignored_octets": 10, "active_timeout_s": 60.0, "idle_timeout_s": 15.0,
        "system_init_ms": 1_699_999_000_123, "frames": 1000, "selected": (990, 800, 709),
    }
    values.update(overrides)
    return ExporterState(**values)


def expected_options(s: ExporterState, odid: int, epid: int, address: Any,
                     interfaces: bool = False) -> dict[int, list[dict[str, Any]]]:
    """Every options record for `s`, keyed as the built-in decoder keys repeated elements (name, name#2)."""
    addr = None if address is None else ip_address(address)
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    reliability: dict[str, Any] = {"exportingProcessId": epid}
    if addr is not None:
        reliability[f"exporterIPv{addr.version}Address"] = str(addr)
    reliability.update({
        "notSentFlowTotalCount": s.not_sent_flows, "notSentPacketTotalCount": s.not_sent_packets,
        "notSentOctetTotalCount": s.not_sent_octets, "observationTimeMilliseconds": s.not_sent_first_ms,
        "observationTimeMilliseconds#2": s.not_sent_last_ms,
    })
    out = {
        CONFIG_TEMPLATE_ID: [{
            "observationDomainId": odid, "samplingInterval": s.sampling_interval,
            "samplingPacketInterval": s.sampling_interval, "flowActiveTimeout": round(s.active_timeout_s),
            "flowIdleTimeout": round(s.idle_timeout_s), "systemInitTimeMilliseconds": s.system_init_ms,
        }],
        FLOW_KEYS_TEMPLATE_ID: [{"templateId": 256, "flowKeyIndicator": 0b100111111111},
                                {"templateId": 257, "flowKeyIndicator": 0b100111111111}],
        METERING_TEMPLATE_ID: [{
            "observationDomainId": odid, "exportedMessageTotalCount": s.exported_messages,
            "exportedFlowRecordTotalCount": s.exported_flows, "exportedOctetTotalCount": s.exported_octets,
            "packetTotalCount": s.observed_packets, "octetTotalCount": s.observed_octets,
            "ignoredPacketTotalCount": s.ignored_packets, "ignoredOctetTotalCount": s.ignored_octets,
            "observationTimeMilliseconds": s.ignored_first_ms, "observationTimeMilliseconds#2": s.ignored_last_ms,
        }],
        RELIABILITY_TEMPLATE_ID: [reliability],
        265: [{"selectionSequenceId": 1, "observationDomainId": odid, "selectorId": 1, "selectorId#2": 2,
               "selectorId#3": 3}],
        266: [{"selectorId": 1, "selectorAlgorithm": 5}, {"selectorId": 2, "selectorAlgorithm": 5}],
        267: [{"selectorId": 3, "selectorAlgorithm": 4, "samplingProbability": s.sampling_probability}],
        268: [{"selectionSequenceId": 1, "selectorIdTotalPktsObserved": s.frames,
               "selectorIdTotalPktsSelected": s.selected[0], "selectorIdTotalPktsSelected#2": s.selected[1],
               "selectorIdTotalPktsSelected#3": s.selected[2]}],
    }
    if interfaces and s.interfaces:
        out[INTERFACES] = [{"ingressInterface": i.ifindex, "interfaceName": i.name,
                            "interfaceDescription": i.description} for i in s.interfaces]
    return dict(sorted(out.items()))


class IpfixPackage:
    """The `ipfix` package's decoder, one session; records tagged with their template id.

    Decoded by position (its name-keyed decoding keeps one value of a repeated element), then
    keyed as the built-in decoder keys them: name, name#2, name#3.
    """

    def __init__(self) -> None:
        self.buf = ipfix.message.MessageBuffer()

        def unknown(_buf: Any, _set: Any) -> None:
            raise AssertionError("data set before its template")

        self.buf.unknown_data_set_hook = unknown

    def decode(self, raw: bytes) -> list[tuple[int, dict[str, Any]]]:
        def tagged(tmpl: Any, buf: Any, offset: int, recinf: Any = None) -> tuple[tuple[int, dict[str, Any]], int]:
            values, end = ipfix.template.Template.decode_from(tmpl, buf, offset)
            seen: dict[str, int] = {}
            rec = {}
            for element, value in zip(tmpl.ies, values, strict=True):
                seen[element.name] = seen.get(element.name, 0) + 1
                rec[element.name if seen[element.name] == 1 else f"{element.name}#{seen[element.name]}"] = value
            return (tmpl.tid, rec), end

        self.buf.from_bytes(raw)
        return list(self.buf.record_iterator(decode_fn=tagged))


def plain(value: Any) -> Any:
    """The ipfix package's Python values as the plain ints and strings the oracle uses."""
    if isinstance(value, datetime):
        return round((value - EPOCH) / timedelta(milliseconds=1))
    if isinstance(value, IPv4Address | IPv6Address):
        return str(value)
    return value


def options_by_template(records: list[tuple[int, dict[str, Any]]]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for tid, rec in records:
        if tid in OPTIONS_IDS:
            out.setdefault(tid, []).append({k: plain(v) for k, v in rec.items()})
    return dict(sorted(out.items()))


# --- round trip -------------------------------------------------------------------------------

@SETTINGS
@given(s=states(with_interfaces=True), odid=st.integers(0, U32 - 1), epid=st.integers(0, U32 - 1),
       address=addresses, mtu=st.sampled_from([MTU_MIN, 1400]) | st.integers(MTU_MIN, 1500))
def test_options_round_trip_ipfix_package(s: ExporterState, odid: int, epid: int, address: Any, mtu: int) -> None:
    enc = Encoder(odid=odid, mtu=mtu, exporting_process_id=epid, exporter_address=address)
    dec = IpfixPackage()
    got = [rec for raw in enc.encode_options(s, NOW) for rec in dec.decode(raw)]
    assert options_by_template(got) == expected_options(s, odid, epid, address, interfaces=True)
    for tid in OPTIONS_IDS:
        tmpl = dec.buf.templates[(odid, tid)]
        scope = 2 if tid == RELIABILITY_TEMPLATE_ID and address is not None else 1
        assert tmpl.scopecount == scope
        assert tmpl.ies[0].name == SCOPES[tid]
        assert [(e.pen, e.num) for e in tmpl.ies] == [(0, IANA_IDS[e.name]) for e in tmpl.ies]


@SETTINGS
@given(s=states(with_interfaces=True), odid=st.integers(0, U32 - 1), epid=st.integers(0, U32 - 1),
       address=addresses, n=st.integers(0, 60))
def test_options_round_trip_builtin_decoder(s: ExporterState, odid: int, epid: int, address: Any, n: int) -> None:
    enc = Encoder(odid=odid, mtu=MTU_MIN, exporting_process_id=epid, exporter_address=address)
    dec = Decoder()
    records = []
    for raw in enc.encode(random_records(n, seed=n), NOW, options=s):
        res = dec.feed(raw, "exporter")
        assert not res.malformed and not res.unknown_sets and not res.gaps
        records.extend(res.records)
    got: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        if r.is_options:
            scope = [SCOPES[r.template_id]]
            if r.template_id == RELIABILITY_TEMPLATE_ID and address is not None:
                scope.append(f"exporterIPv{exporter_family(address)}Address")
            assert r.scope == tuple(scope)
            got.setdefault(r.template_id, []).append(r.fields)
    assert dict(sorted(got.items())) == expected_options(s, odid, epid, address, interfaces=True)
    assert sum(not r.is_options for r in records) == n
    # Options records come first: the order a collector learns sampling rate and flow keys before flows.
    kinds = [r.is_options for r in records]
    assert kinds == sorted(kinds, reverse=True)
    templates = dec.templates("exporter", odid)
    assert {tid: t.scope_count for tid, t in templates.items()} == {
        256: 0, 257: 0, **dict.fromkeys(OPTIONS_IDS, 1),
        RELIABILITY_TEMPLATE_ID: 1 if address is None else 2}


def exporter_family(address: Any) -> int:
    ip = ip_address(address)
    return 4 if ip.version == 4 or (isinstance(ip, IPv6Address) and ip.ipv4_mapped) else 6


def test_flow_key_indicator_marks_the_key_fields() -> None:
    dec = Decoder()
    records = [r for raw in Encoder().encode_options(state(), NOW) for r in dec.feed(raw).records]
    templates = dec.templates("-", 0)
    indicators = {r.fields["templateId"]: r.fields["flowKeyIndicator"] for r in records
                  if r.template_id == FLOW_KEYS_TEMPLATE_ID}
    assert set(indicators) == {256, 257}
    for tid, family in ((256, "IPv4"), (257, "IPv6")):
        names = [f.name for f in templates[tid].fields]  # as the collector decoded the template
        bits = int(indicators[tid])
        assert bits >> len(names) == 0, "bits past the last field must be 0"
        assert {name for i, name in enumerate(names) if bits >> i & 1} == FLOW_KEY_FIELDS[family]
    assert FLOW_V4.flow_key_indicator == FLOW_V6.flow_key_indicator == indicators[256]


@pytest.mark.parametrize(("address", "field", "text"), [
    (None, None, None),
    ("192.0.2.9", "exporterIPv4Address", "192.0.2.9"),
    (IPv4Address("198.51.100.1"), "exporterIPv4Address", "198.51.100.1"),
    ("2001:db8::7", "exporterIPv6Address", "2001:db8::7"),
    ("::ffff:192.0.2.10", "exporterIPv4Address", "192.0.2.10"),
])
def test_exporter_address_variants(address: Any, field: str | None, text: str | None) -> None:
    enc = Encoder(exporter_address=address)
    reliability = next(t for t in enc.options_templates if t.template_id == RELIABILITY_TEMPLATE_ID)
    extra = [n for n in reliability.names if n.startswith("exporterIP")]
    assert extra == ([field] if field else [])
    # RFC 7011 4.3: whichever identifies the Exporting Process is a scope field (libfds insists).
    assert reliability.scope_count == 1 + len(extra)
    recs = [r for raw in enc.encode_options(state(), NOW) for r in Decoder().feed(raw).records
            if r.template_id == RELIABILITY_TEMPLATE_ID]
    assert len(recs) == 1
    assert recs[0].fields.get(field or "", None) == text


def test_options_templates_scopes_on_the_wire() -> None:
    enc = Encoder(exporter_address="2001:db8::1")
    msg = parse(enc.templates_message(NOW), enc)
    seen = {}
    for set_id, body in msg.sets:
        if set_id != 3:
            continue
        tid, count, scope = struct.unpack_from("!HHH", body, 0)
        first_ie = struct.unpack_from("!H", body, 6)[0]
        seen[tid] = (scope, first_ie)
        assert 6 + 4 * count == len(body), "one options template per set (nfacctd reads no more)"
    assert seen == {tid: (2 if tid == RELIABILITY_TEMPLATE_ID else 1, IANA_IDS[SCOPES[tid]]) for tid in OPTIONS_IDS}
    for t in Encoder().options_templates:
        assert t.scope_count == 1 and t.set_id == 3


# --- messages ---------------------------------------------------------------------------------

@SETTINGS
@given(n=st.integers(0, 400), share=st.sampled_from([0.0, 0.5, 1.0]), address=addresses,
       mtu=st.integers(MTU_MIN, 1600) | st.sampled_from([MTU_MIN, 9000, 65535]), rounds=st.integers(1, 3))
def test_options_and_data_fit_the_mtu(n: int, share: float, address: Any, mtu: int, rounds: int) -> None:
    enc = Encoder(mtu=mtu, exporter_address=address, template_refresh_messages=4)
    known: set[int] = set()
    for r in range(rounds):
        recs = random_records(n, seed=n + r, ipv6_share=share)
        flows = options = 0
        seen_flow = False
        for raw in enc.encode(recs, NOW + r, options=state()):
            msg = parse(raw, enc)  # checks lengths, no empty set, whole records, no padding
            assert msg.length <= mtu
            assert msg.data_records + sum(k for _, k in msg.options_sets()) > 0
            for set_id, _ in msg.sets:
                if set_id < 256:
                    known.update(msg.template_ids())
                else:
                    assert set_id in known, "data set before its template"
            if msg.options_sets():
                assert not seen_flow, "options records go before flow records"
            seen_flow = seen_flow or bool(msg.data_sets())
            flows += msg.data_records
            options += sum(k for _, k in msg.options_sets())
        assert (flows, options) == (n, OPTIONS_PER_STATE)


def test_smallest_mtu_splits_templates_options_and_data() -> None:
    enc = Encoder(mtu=MTU_MIN, exporter_address="2001:db8::1")
    msgs = [parse(m, enc) for m in enc.encode(random_records(10, ipv6_share=1.0), NOW, options=state())]
    assert all(m.length <= MTU_MIN for m in msgs)
    assert msgs[0].template_ids() == [256, 257, *OPTIONS_IDS]
    assert sum(k for m in msgs for _, k in m.options_sets()) == OPTIONS_PER_STATE
    assert sum(m.data_records for m in msgs) == 10


def test_encode_without_options_or_records_sends_nothing() -> None:
    enc = Encoder(sequence=7)
    assert enc.encode(np.zeros(0, dtype=FLOW_RECORD), NOW) == []
    assert enc.sequence == 7
    assert enc.totals.messages == 0
    out = enc.encode(np.zeros(0, dtype=FLOW_RECORD), NOW, options=state())
    assert len(out) == 1
    msg = parse(out[0])
    assert msg.template_ids() == [256, 257, *OPTIONS_IDS]
    assert msg.options_sets() == [(tid, 2 if tid in (FLOW_KEYS_TEMPLATE_ID, 266) else 1) for tid in OPTIONS_IDS
                                  if tid != INTERFACES]


# --- sequence numbers -------------------------------------------------------------------------

Step = tuple[str, int]  # ("data" | "options" | "both" | "templates", record count)
steps = st.lists(st.tuples(st.sampled_from(["data", "options", "both", "templates"]), st.integers(0, 300)),
                 min_size=1, max_size=8)


def run_steps(enc: Encoder, plan: list[Step]) -> list[bytes]:
    out: list[bytes] = []
    for i, (kind, n) in enumerate(plan):
        now = NOW + i
        if kind == "templates":
            out.append(enc.templates_message(now))
        elif kind == "options":
            out.extend(enc.encode_options(state(), now))
        else:
            out.extend(enc.encode(random_records(n, seed=i), now, options=state() if kind == "both" else None))
    return out


@SETTINGS
@given(mode=st.sampled_from(["rfc", "nfdump"]), start=st.integers(U32 - 2000, U32 - 1) | st.integers(0, U32 - 1),
       plan=steps, mtu=st.sampled_from([MTU_MIN, 1400, 9000]))
def test_sequence_numbers_per_mode_across_wrap(mode: SequenceMode, start: int, plan: list[Step], mtu: int) -> None:
    enc = Encoder(mtu=mtu, sequence=start, sequence_mode=mode)
    counted = 0
    for raw in run_steps(enc, plan):
        msg = parse(raw)
        assert msg.sequence == (start + counted) % U32
        options = sum(k for _, k in msg.options_sets())
        counted += msg.data_records + (options if mode == "rfc" else 0)
    assert enc.sequence == (start + counted) % U32


@SETTINGS
@given(enc_mode=st.sampled_from(["rfc", "nfdump"]), count_options=st.booleans(),
       start=st.integers(U32 - 2000, U32 - 1) | st.integers(0, U32 - 1), plan=steps)
def test_builtin_collector_sees_gaps_only_on_dialect_mismatch(enc_mode: SequenceMode, count_options: bool, start: int,
                                                             plan: list[Step]) -> None:
    enc = Encoder(mtu=MTU_MIN, sequence=start, sequence_mode=enc_mode)
    dec = Decoder(count_options=count_options)
    msgs = run_steps(enc, plan)
    gaps = [g for raw in msgs for g in dec.feed(raw, "exp").gaps]
    assert dec.stats.malformed == 0
    if (enc_mode == "rfc") == count_options:
        assert gaps == []
    else:
        # Each message after one with options records is off by those records: lost (+) or replayed (-).
        sign = 1 if enc_mode == "rfc" else -1
        expected = []
        for before in msgs[:-1]:
            k = sum(n for _, n in parse(before).options_sets())
            if k:
                expected.append(sign * k)
        assert [g.delta for g in gaps] == expected


def test_dialects_on_a_fixed_stream() -> None:
    cases: list[tuple[SequenceMode, bool]] = [("rfc", True), ("nfdump", False), ("rfc", False), ("nfdump", True)]
    for mode, count_options in cases:
        enc = Encoder(sequence=U32 - 3, sequence_mode=mode)
        dec = Decoder(count_options=count_options)
        stream = [*enc.encode_options(state(), NOW), *enc.encode(random_records(50), NOW + 1),
                  *enc.encode(random_records(5), NOW + 2, options=state()), *enc.encode(random_records(5), NOW + 3)]
        gaps = [g.delta for raw in stream for g in dec.feed(raw).gaps]
        if mode == "rfc":
            assert enc.sequence == (U32 - 3 + 2 * OPTIONS_PER_STATE + 60) % U32
        else:
            assert enc.sequence == 57
        matched = (mode == "rfc") == count_options
        assert gaps == ([] if matched else [OPTIONS_PER_STATE if mode == "rfc" else -OPTIONS_PER_STATE] * 2)


# --- template refresh -------------------------------------------------------------------------

def template_ids(raw: bytes) -> list[int]:
    return parse(raw).template_ids()


ALL_IDS = [256, 257, *OPTIONS_IDS]


def test_refresh_carries_options_templates() -> None:
    enc = Encoder(mtu=MTU_MIN, template_refresh_s=100, template_refresh_messages=5)
    assert template_ids(enc.templates_message(NOW)) == ALL_IDS
    # Message-count refresh: every 5th message, whether it holds options or flows.
    out = enc.encode(random_records(80, ipv6_share=0.0), NOW, options=state())
    assert [template_ids(m) for m in out] == [ALL_IDS if i % 5 == 4 else [] for i in range(len(out))]
    # Time refresh, then reset.
    enc = Encoder(template_refresh_s=100, template_refresh_messages=10**6)
    assert template_ids(enc.encode_options(state(), NOW)[0]) == ALL_IDS
    assert template_ids(enc.encode_options(state(), NOW + 99)[0]) == []
    assert template_ids(enc.encode(random_records(3), NOW + 100)[0]) == ALL_IDS
    assert template_ids(enc.encode_options(state(), NOW + 101)[0]) == []
    enc.reset_templates()
    assert template_ids(enc.encode_options(state(), NOW + 102)[0]) == ALL_IDS


# --- accounting helpers -----------------------------------------------------------------------

def test_flow_totals_and_encoded_totals() -> None:
    recs = random_records(500, seed=4, ipv6_share=0.3)
    enc = Encoder(mtu=600)
    msgs = enc.encode(recs, NOW, options=state())
    per_message = [enc.flow_totals(m) for m in msgs]
    assert per_message[0] == FlowTotals(parse(msgs[0]).data_records, *(
        sum(int(r[k]) for r in recs[: parse(msgs[0]).data_records]) for k in ("packets", "octets")))
    total = sum(per_message, FlowTotals())
    assert total == FlowTotals(500, int(recs["packets"].sum()), int(recs["octets"].sum()))
    assert enc.flow_totals(enc.templates_message(NOW)) == FlowTotals()
    assert enc.flow_totals(enc.encode_options(state(), NOW)[0]) == FlowTotals()
    t = enc.totals
    assert (t.messages, t.flow_records, t.options_records) == (len(msgs) + 2, 500, 2 * OPTIONS_PER_STATE)
    assert t.octets == sum(map(len, msgs)) + len(enc.templates_message(NOW)) + len(enc.encode_options(state(), NOW)[0])
    with pytest.raises(ValueError):
        enc.flow_totals(msgs[0][:-1])


# --- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    {"not_sent_flows": -1}, {"observed_octets": U64}, {"ignored_packets": 1 << 70},
    {"sampling_interval": 0}, {"sampling_interval": U32}, {"active_timeout_s": 65536},
    {"idle_timeout_s": -1}, {"system_init_ms": -5},
])
def test_state_rejects_values_that_do_not_fit(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        state(**overrides)


def test_state_rejects_non_integer_counts_and_accepts_numpy_integers() -> None:
    with pytest.raises(TypeError):
        state(observed_packets=1.5)
    s = state(observed_packets=np.uint64(U64 - 1), active_timeout_s=59.6)
    rec = [r for raw in Encoder().encode_options(s, NOW) for r in Decoder().feed(raw).records]
    fields = {k: v for r in rec for k, v in r.fields.items()}
    assert fields["packetTotalCount"] == U64 - 1
    assert fields["flowActiveTimeout"] == 60


@pytest.mark.parametrize("kwargs", [{"sequence_mode": "ipfixcol"}, {"exporting_process_id": -1},
                                    {"exporting_process_id": U32}, {"exporter_address": "not an address"}])
def test_encoder_rejects_bad_options_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Encoder(**kwargs)


def test_template_flow_key_validation() -> None:
    with pytest.raises(ValueError):
        Template.from_names(300, ["octetDeltaCount"], keys=["packetDeltaCount"])
    with pytest.raises(ValueError):
        Template.from_names(300, ["observationDomainId", "octetDeltaCount"], scope_count=1,
                            keys=["observationDomainId"])
    second = Template.from_names(300, ["sourceIPv4Address", "octetDeltaCount"], keys=["octetDeltaCount"])
    assert second.flow_key_indicator == 0b10
    # flowKeyIndicator has 64 bits, so a key past the 64th field cannot be marked (RFC 7011 4.4).
    names = [e.name for e in ipfix.ie.dump_infomodel() if e.pen == 0 and e.type.name == "unsigned64"][:65]
    assert len(names) == 65
    assert Template.from_names(300, names, keys=[names[63]]).flow_key_indicator == 1 << 63
    with pytest.raises(ValueError):
        Template.from_names(300, names, keys=[names[64]])


# --- RFC 7011 4.2/4.3 and RFC 5476 structure ----------------------------------------------------

TIME_IES = {322, 323, 324, 325}


def wire_templates(enc: Encoder) -> dict[int, tuple[int, list[int]]]:
    """Options templates as sent: template id -> (scope count, element ids), read off the wire."""
    out = {}
    for set_id, body in parse(enc.templates_message(NOW), enc).sets:
        if set_id == 3:
            tid, count, scope = struct.unpack_from("!HHH", body, 0)
            out[tid] = (scope, [struct.unpack_from("!H", body, 6 + 4 * i)[0] & 0x7FFF for i in range(count)])
    return out


def reliability_kind(scope: int, ids: list[int]) -> str | None:
    """What ipfixcol2's library (libfds) would call an options template, as its rules are documented:

    4.2 metering reliability: observationDomainId (149) or meteringProcessId (143), each present one a
    scope field once; ignoredPacketTotalCount and ignoredOctetTotalCount (164, 165) as non-scope fields;
    exactly two of the observationTime* elements (322-325). 4.3 exporting reliability: whichever of
    exporterIPv4Address, exporterIPv6Address, exportingProcessId (130, 131, 144) is present is a scope
    field, once; notSent* (166-168) and the same two times."""
    scoped, rest = ids[:scope], ids[scope:]
    two_times = sum(i in TIME_IES for i in rest) == 2

    def identified_by(candidates: set[int]) -> bool:
        present = [i for i in ids if i in candidates]
        return bool(present) and all(ids.count(i) == 1 and i in scoped for i in present)

    if identified_by({149, 143}) and {164, 165} <= set(rest) and two_times:
        return "metering reliability"
    if identified_by({130, 131, 144}) and {166, 167, 168} <= set(rest) and two_times:
        return "exporting reliability"
    return None


@pytest.mark.parametrize("address", [None, "192.0.2.1", "2001:db8::1"])
def test_reliability_templates_have_the_section_4_structure(address: str | None) -> None:
    shapes = wire_templates(Encoder(exporter_address=address))
    assert reliability_kind(*shapes[METERING_TEMPLATE_ID]) == "metering reliability"
    assert reliability_kind(*shapes[RELIABILITY_TEMPLATE_ID]) == "exporting reliability"
    assert all(reliability_kind(*shapes[t]) is None for t in shapes
               if t not in (METERING_TEMPLATE_ID, RELIABILITY_TEMPLATE_ID))


def test_reliability_check_would_catch_a_missing_window() -> None:
    """The structural oracle above fails the old shapes (no time window, address not a scope field)."""
    assert reliability_kind(1, [149, 41, 42, 40, 86, 85, 164, 165]) is None
    assert reliability_kind(1, [144, 166, 167, 168, 130, 323, 323]) is None
    assert reliability_kind(1, [144, 166, 167, 168, 323, 323, 323]) is None


def test_selection_reports_follow_rfc5476() -> None:
    shapes = wire_templates(Encoder())
    # 6.5.1: scope selectionSequenceId, an element for the observation point, the selectors in order.
    assert shapes[265] == (1, [301, 149, 302, 302, 302])
    # 6.5.2: scope selectorId, selectorAlgorithm, the algorithm's parameters.
    assert shapes[266] == (1, [302, 304])
    assert shapes[267] == (1, [302, 304, 311])
    # 6.5.3: scope selectionSequenceId, packets observed, then packets selected after each selector.
    assert shapes[268] == (1, [301, 318, 319, 319, 319])
    got = {r.template_id: r.fields for raw in Encoder().encode_options(state(sampling_interval=4,
                                                                           sampling_probability=0.25), NOW)
           for r in Decoder().feed(raw).records if r.template_id in (265, 267)}
    assert [got[265][k] for k in ("selectorId", "selectorId#2", "selectorId#3")] == [1, 2, 3]
    assert got[267] == {"selectorId": 3, "selectorAlgorithm": 4, "samplingProbability": 0.25}


@pytest.mark.parametrize("chain", [(10, (11, 5, 5)), (10, (9, 9, 10)), (10, (5, 6, 1))])
def test_state_rejects_a_selector_selecting_more_than_it_saw(chain: tuple[int, tuple[int, int, int]]) -> None:
    with pytest.raises(ValueError, match="cannot select more"):
        state(frames=chain[0], selected=chain[1])


# --- interface names ------------------------------------------------------------------------

ETH0 = Interface(2, "eth0", "uplink to the core")
VETH = Interface(9, "veth-obs")


def interface_records(msgs: list[bytes], dec: Decoder | None = None) -> list[dict[str, Any]]:
    dec = dec or Decoder()
    return [r.fields for raw in msgs for r in dec.feed(raw).records if r.template_id == INTERFACES]


def test_interface_names_go_with_the_templates_and_when_they_change() -> None:
    enc = Encoder(template_refresh_s=60, template_refresh_messages=10**6)
    dec = Decoder()
    first = interface_records(enc.encode_options(state(interfaces=(ETH0,)), NOW), dec)
    assert first == [{"ingressInterface": 2, "interfaceName": "eth0", "interfaceDescription": "uplink to the core"}]
    assert interface_records(enc.encode_options(state(interfaces=(ETH0,)), NOW + 10), dec) == [], \
        "unchanged interfaces wait for the template refresh"
    appeared = interface_records(enc.encode_options(state(interfaces=(ETH0, VETH)), NOW + 20), dec)
    assert [r["interfaceName"] for r in appeared] == ["eth0", "veth-obs"]
    assert interface_records(enc.encode_options(state(interfaces=(ETH0, VETH)), NOW + 90), dec) != [], \
        "the time-based template refresh names them again"
    enc.reset_templates()
    assert len(interface_records(enc.encode_options(state(interfaces=(ETH0, VETH)), NOW + 91), dec)) == 2


def test_long_interface_descriptions_take_the_three_octet_length() -> None:
    long = Interface(3, "br0", "d" * 256)
    recs = interface_records(Encoder().encode_options(state(interfaces=(long, ETH0)), NOW))
    assert [r["interfaceDescription"] for r in recs] == ["d" * 256, ETH0.description]
    with pytest.raises(ValueError):
        Interface(3, "br0", "d" * 257)


# --- exporter identity ------------------------------------------------------------------------

def test_exporter_address_follows_the_session_and_a_new_family_resends_templates() -> None:
    enc = Encoder(template_refresh_s=1e9, template_refresh_messages=10**6)
    dec = Decoder()

    def reliability(msgs: list[bytes]) -> dict[str, Any]:
        (rec,) = [r for raw in msgs for r in dec.feed(raw).records if r.template_id == RELIABILITY_TEMPLATE_ID]
        return rec.fields

    assert "exporterIPv4Address" not in reliability(enc.encode_options(state(), NOW))
    enc.set_exporter_address("198.18.0.1")
    msgs = enc.encode_options(state(), NOW + 1)
    assert parse(msgs[0], enc).template_ids() == ALL_IDS, "template 261 changed shape: announced again at once"
    assert reliability(msgs)["exporterIPv4Address"] == "198.18.0.1"
    enc.set_exporter_address("198.18.0.2")  # same shape: only the value changes
    msgs = enc.encode_options(state(), NOW + 2)
    assert parse(msgs[0], enc).template_ids() == [] and reliability(msgs)["exporterIPv4Address"] == "198.18.0.2"
    enc.set_exporter_address("fd00::2")
    msgs = enc.encode_options(state(), NOW + 3)
    assert parse(msgs[0], enc).template_ids() == ALL_IDS and reliability(msgs)["exporterIPv6Address"] == "fd00::2"
    assert dec.stats.malformed == 0 and dec.stats.unknown_template_sets == 0
