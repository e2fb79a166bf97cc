"""The collector's RFC 7011 decoder against an independent encoder and hand-built messages.

Three sources of input: messages written by the `ipfix` package's MessageBuffer (an encoder we did
not write, so agreement is evidence), messages assembled here byte by byte with struct (for the
corners the package cannot produce: options withdrawal forms, padding, reduced-size signed ints,
NTP timestamps, sequence wrap), and hypothesis-generated garbage or mutations of valid messages
(the decoder must neither raise nor take long).
"""

from __future__ import annotations

import gc
import math
import struct
import time
import tracemalloc
from datetime import datetime, timedelta
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import ipfix.ie
import ipfix.message
import ipfix.template
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collectors.decoder import SEQ_MOD, Decoder, ElementInfo, converter_for, default_registry

EPOCH = datetime(1970, 1, 1)
EXPORT_TIME = 1_700_000_000
TEST_PEN = 35566
FAST = settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])

default_registry()  # load IANA + RFC 5103 into the ipfix package before building its templates
ipfix.ie.for_spec(f"xdpflowTestCounter({TEST_PEN}/7)<unsigned32>[4]")
EXTRA = {(TEST_PEN, 7): ElementInfo("xdpflowTestCounter", "unsigned32")}


# --- hand-built wire format --------------------------------------------------------------------


def fs(eid: int, length: int, pen: int = 0) -> bytes:
    if pen:
        return struct.pack("!HHI", eid | 0x8000, length, pen)
    return struct.pack("!HH", eid, length)


def trec(tid: int, *fields: bytes) -> bytes:
    return struct.pack("!HH", tid, len(fields)) + b"".join(fields)


def otrec(tid: int, scope: int, *fields: bytes) -> bytes:
    return struct.pack("!HHH", tid, len(fields), scope) + b"".join(fields)


def iset(set_id: int, *records: bytes, pad: bytes = b"") -> bytes:
    body = b"".join(records) + pad
    return struct.pack("!HH", set_id, 4 + len(body)) + body


def msg(*sets: bytes, seq: int = 0, odid: int = 1, export_time: int = EXPORT_TIME) -> bytes:
    body = b"".join(sets)
    return struct.pack("!HHIII", 10, 16 + len(body), export_time, seq, odid) + body


def u(v: int, n: int) -> bytes:
    return v.to_bytes(n, "big")


def varlen(b: bytes) -> bytes:
    return (bytes([len(b)]) if len(b) < 255 else b"\xff" + struct.pack("!H", len(b))) + b


# A plain IPv4 flow template: src, dst, octets (reduced to 4), packets (8), proto.
FLOW_T = trec(256, fs(8, 4), fs(12, 4), fs(1, 4), fs(2, 8), fs(4, 1))


def flow_rec(src: str, dst: str, octets: int, packets: int, proto: int) -> bytes:
    return IPv4Address(src).packed + IPv4Address(dst).packed + u(octets, 4) + u(packets, 8) + u(proto, 1)


# --- the ipfix package as an independent encoder and decoder -----------------------------------


def ipfix_message(
    mb: ipfix.message.MessageBuffer,
    odid: int,
    templates: list[ipfix.template.Template],
    sets: list[tuple[int, list[dict[str, Any]]]],
) -> bytes:
    mb.begin_export(odid)
    for t in templates:
        mb.add_template(t)
    for tid, recs in sets:
        if recs:
            mb.export_ensure_set(tid)
            for r in recs:
                mb.export_namedict(r)
    mb.export_epoch = EXPORT_TIME  # to_bytes() would call utcnow() otherwise
    mb.auto_export_time = False
    return mb.to_bytes()


def normalise(v: Any) -> Any:
    """The ipfix package's native values in our representation."""
    if isinstance(v, IPv4Address | IPv6Address):
        return v
    if isinstance(v, datetime):
        return (v - EPOCH) // timedelta(milliseconds=1)
    if isinstance(v, bytes):
        return v.hex(":") if len(v) == 6 else v.hex()
    return v


FLOW_SPECS = [
    "sourceIPv4Address",
    "destinationIPv6Address",
    "octetDeltaCount",
    "packetDeltaCount[4]",
    "protocolIdentifier",
    "sourceTransportPort",
    "sourceMacAddress",
    "interfaceName",
    "flowStartSeconds",
    "flowEndMilliseconds",
    "samplingProbability",
    "dataRecordsReliability",
    "reverseOctetDeltaCount",
    f"xdpflowTestCounter({TEST_PEN}/7)",
]


FLOW_NAMES = [e.name for e in ipfix.ie.spec_list(FLOW_SPECS)]


def flow_template(tid: int = 300) -> ipfix.template.Template:
    return ipfix.template.from_ielist(tid, ipfix.ie.spec_list(FLOW_SPECS))


def options_template(tid: int = 400) -> ipfix.template.Template:
    t = ipfix.template.from_ielist(
        tid, ipfix.ie.spec_list(["observationDomainId", "exportedMessageTotalCount", "samplingInterval"])
    )
    t.scopecount = 1
    return t


flow_dicts = st.fixed_dictionaries(
    {
        "sourceIPv4Address": st.integers(0, 2**32 - 1).map(IPv4Address),
        "destinationIPv6Address": st.integers(0, 2**128 - 1).map(IPv6Address),
        "octetDeltaCount": st.integers(0, 2**64 - 1),
        "packetDeltaCount": st.integers(0, 2**32 - 1),
        "protocolIdentifier": st.integers(0, 255),
        "sourceTransportPort": st.integers(0, 65535),
        "sourceMacAddress": st.binary(min_size=6, max_size=6),
        "interfaceName": st.text(max_size=300).filter(lambda s: len(s.encode()) < 65535),
        "flowStartSeconds": st.integers(0, 2**32 - 1).map(lambda s: EPOCH + timedelta(seconds=s)),
        "flowEndMilliseconds": st.integers(0, 2**42).map(lambda ms: EPOCH + timedelta(milliseconds=ms)),
        "samplingProbability": st.floats(allow_nan=False),
        "dataRecordsReliability": st.booleans(),
        "reverseOctetDeltaCount": st.integers(0, 2**64 - 1),
        "xdpflowTestCounter": st.integers(0, 2**32 - 1),
    }
)


def expected_value(name: str, v: Any) -> Any:
    if name == "flowStartSeconds":
        return (v - EPOCH) // timedelta(seconds=1)
    if isinstance(v, IPv6Address):
        return v.compressed if v.ipv4_mapped is None else f"::ffff:{v.ipv4_mapped}"
    if isinstance(v, IPv4Address):
        return str(v)
    return normalise(v)


@FAST
@given(st.lists(flow_dicts, min_size=1, max_size=8))
def test_ipfix_package_messages_decode_to_the_values_encoded(recs: list[dict[str, Any]]) -> None:
    mb = ipfix.message.MessageBuffer()
    raw = ipfix_message(mb, 7, [flow_template()], [(300, recs)])
    dec = Decoder(extra_elements=EXTRA)
    res = dec.feed(raw, "192.0.2.1:4000")
    assert not res.malformed and not res.gaps
    assert len(res.records) == len(recs)
    for got, want in zip(res.records, recs, strict=True):
        assert (got.odid, got.template_id, got.is_options, got.export_time) == (7, 300, False, EXPORT_TIME)
        assert list(got.fields) == FLOW_NAMES  # template order, IANA / RFC 5103 / extra names
        for name, v in want.items():
            if name == "flowEndMilliseconds":
                assert abs(got.fields[name] - expected_value(name, v)) <= 1  # the package encodes via a float
            else:
                assert got.fields[name] == expected_value(name, v), name

    # and the package's own decoder agrees with ours on the same bytes
    theirs = ipfix.message.MessageBuffer()
    theirs.from_bytes(raw)
    for got, their in zip(res.records, theirs.namedict_iterator(), strict=True):
        for name, v in their.items():
            ours: Any = got.fields[name]
            if name == "flowStartSeconds":
                assert EPOCH + timedelta(seconds=ours) == v
            elif name == "flowEndMilliseconds":
                assert abs(ours - normalise(v)) <= 1  # theirs goes through a float
            elif isinstance(v, IPv4Address | IPv6Address):
                assert ip_address(ours) == v
            else:
                assert ours == normalise(v), name


def test_ipfix_package_options_and_sequences_across_messages() -> None:
    mb = ipfix.message.MessageBuffer()
    flow = {
        k: v
        for k, v in zip(
            FLOW_NAMES[:-1],
            [
                IPv4Address("10.0.0.1"),
                IPv6Address("2001:db8::1"),
                1500,
                3,
                6,
                443,
                b"\x02\x00\x00\x00\x00\x01",
                "eth0",
                EPOCH + timedelta(seconds=EXPORT_TIME),
                EPOCH + timedelta(seconds=EXPORT_TIME, milliseconds=250),
                0.5,
                False,
                99,
            ],
            strict=True,
        )
    }
    flow["xdpflowTestCounter"] = 12
    opts = {"observationDomainId": 7, "exportedMessageTotalCount": 2, "samplingInterval": 1}
    msgs = [
        ipfix_message(mb, 7, [flow_template(), options_template()], [(300, [flow] * 3), (400, [opts])]),
        ipfix_message(mb, 7, [], [(300, [flow] * 2)]),
        ipfix_message(mb, 7, [], [(400, [opts]), (300, [flow])]),
        ipfix_message(mb, 7, [], [(300, [flow])]),
    ]
    seqs = [struct.unpack_from("!I", m, 8)[0] for m in msgs]
    assert seqs == [0, 4, 6, 8]  # the package counts options records, as RFC 7011 says

    rfc = Decoder(extra_elements=EXTRA)
    nfdump_style = Decoder(extra_elements=EXTRA, count_options=False)
    for m in msgs:
        rfc.feed(m, "x")
        nfdump_style.feed(m, "x")
    assert rfc.stats.gaps == 0
    assert (rfc.stats.records, rfc.stats.options_records) == (9, 2)
    # 4 where it expected 3 (resynchronises on 4 + 2), then 8 where it expected 6 + 1
    assert nfdump_style.stats.gaps == 2 and nfdump_style.stats.lost_records == 2
    res = Decoder(extra_elements=EXTRA).feed(msgs[0], "x")
    opt = [r for r in res.records if r.is_options]
    assert len(opt) == 1 and opt[0].template_id == 400
    assert opt[0].fields == opts and opt[0].scope == ("observationDomainId",)


# --- hand-built messages -----------------------------------------------------------------------


def test_flow_records_reduced_size_and_multiple_sets() -> None:
    dec = Decoder()
    raw = msg(
        iset(2, FLOW_T),
        iset(256, flow_rec("10.0.0.1", "10.0.0.2", 4_000_000_000, 2**40, 6)),
        iset(256, flow_rec("10.0.0.3", "10.0.0.4", 1, 1, 17), flow_rec("10.0.0.5", "10.0.0.6", 2, 2, 1)),
    )
    res = dec.feed(raw, "e")
    assert [r.fields["sourceIPv4Address"] for r in res.records] == ["10.0.0.1", "10.0.0.3", "10.0.0.5"]
    assert res.records[0].fields == {
        "sourceIPv4Address": "10.0.0.1",
        "destinationIPv4Address": "10.0.0.2",
        "octetDeltaCount": 4_000_000_000,
        "packetDeltaCount": 2**40,
        "protocolIdentifier": 6,
    }
    assert dec.stats.malformed == 0 and dec.stats.templates == 1


def test_reduced_size_types_floats_booleans_and_ntp() -> None:
    extra = {
        (TEST_PEN, 1): ElementInfo("testSigned", "signed32"),
        (TEST_PEN, 2): ElementInfo("testNano", "dateTimeNanoseconds"),
    }
    dec = Decoder(extra_elements=extra)
    t = trec(
        256,
        fs(1, 2),  # octetDeltaCount u64 in 2 octets
        fs(1, 4),
        fs(1, 3, TEST_PEN),  # signed32 in 3 octets
        fs(311, 8),  # samplingProbability float64
        fs(311, 4),  # ... reduced to float32
        fs(276, 1),  # dataRecordsReliability boolean: 1 true
        fs(276, 1),  # 2 false
        fs(276, 1),  # 7 is neither
        fs(154, 8),  # flowStartMicroseconds dateTimeMicroseconds (NTP)
        fs(2, 8, TEST_PEN),  # dateTimeNanoseconds (NTP)
        fs(150, 4),  # flowStartSeconds stays the raw number
        fs(56, 6),  # MAC
    )
    ntp_secs = EXPORT_TIME + 2_208_988_800
    rec = (
        u(65535, 2)
        + u(70000, 4)
        + (-2).to_bytes(3, "big", signed=True)
        + struct.pack("!d", 0.125)
        + struct.pack("!f", float("inf"))
        + b"\x01\x02\x07"
        + u((ntp_secs << 32) | (1 << 31), 8)
        + u((ntp_secs << 32) | (1 << 30), 8)
        + u(EXPORT_TIME, 4)
        + bytes.fromhex("0a0b0c0d0e0f")
    )
    res = dec.feed(msg(iset(2, t), iset(256, rec)), "e")
    assert not res.malformed
    f: dict[str, Any] = res.records[0].fields
    assert f["octetDeltaCount"] == 65535 and f["octetDeltaCount#2"] == 70000
    assert f["testSigned"] == -2
    assert f["samplingProbability"] == 0.125 and math.isinf(f["samplingProbability#2"])
    assert (f["dataRecordsReliability"], f["dataRecordsReliability#2"], f["dataRecordsReliability#3"]) == (
        True,
        False,
        7,
    )
    assert f["flowStartMicroseconds"] == EXPORT_TIME * 1_000_000 + 500_000
    assert f["testNano"] == EXPORT_TIME * 1_000_000_000 + 250_000_000
    assert f["flowStartSeconds"] == EXPORT_TIME
    assert f["sourceMacAddress"] == "0a:0b:0c:0d:0e:0f"


def test_variable_length_fields() -> None:
    dec = Decoder()
    t = trec(256, fs(82, 0xFFFF), fs(8, 4), fs(83, 0xFFFF), fs(313, 0xFFFF))  # interfaceName/Description, ipHeader
    long = "é" * 200  # 400 octets: three-octet length form
    recs = [
        varlen(b"eth0") + IPv4Address("10.1.1.1").packed + varlen(long.encode()) + varlen(b"\x45\x00"),
        varlen(b"") + IPv4Address("10.1.1.2").packed + varlen(b"x" * 254) + varlen(b""),
        varlen(b"\xff\xfebad") + IPv4Address("10.1.1.3").packed + varlen(b"y" * 255) + b"\xff\x00\x00",
    ]
    res = dec.feed(msg(iset(2, t), iset(256, *recs)), "e")
    assert not res.malformed
    got = [r.fields for r in res.records]
    assert got[0] == {
        "interfaceName": "eth0",
        "sourceIPv4Address": "10.1.1.1",
        "interfaceDescription": long,
        "ipHeaderPacketSection": "4500",
    }
    assert (
        got[1]["interfaceName"] == ""
        and got[1]["interfaceDescription"] == "x" * 254
        and got[1]["ipHeaderPacketSection"] == ""
    )
    assert got[2]["interfaceName"] == "\ufffd\ufffdbad" and got[2]["interfaceDescription"] == "y" * 255
    assert got[2]["ipHeaderPacketSection"] == ""  # 255 escape with a zero length


def test_enterprise_elements_known_reverse_and_unknown() -> None:
    dec = Decoder()
    t = trec(256, fs(1, 8, 29305), fs(42, 2, 9999), fs(0x7FFF, 0xFFFF, 4_000_000_000), fs(1, 8))
    rec = u(5, 8) + b"\xbe\xef" + varlen(b"\x01\x02") + u(6, 8)
    res = dec.feed(msg(iset(2, t), iset(256, rec)), "e")
    assert res.records[0].fields == {
        "reverseOctetDeltaCount": 5,
        "_ipfix_9999_42": "beef",
        "_ipfix_4000000000_32767": "0102",
        "octetDeltaCount": 6,
    }
    fields = dec.templates("e", 1)[256].fields
    assert [(f.enterprise, f.element_id) for f in fields] == [(29305, 1), (9999, 42), (4_000_000_000, 0x7FFF), (0, 1)]


def test_options_template_and_options_data() -> None:
    dec = Decoder()
    ot = otrec(258, 2, fs(149, 4), fs(10, 4), fs(164, 8), fs(165, 8))
    rec = u(1, 4) + u(3, 4) + u(10, 8) + u(1500, 8)
    res = dec.feed(msg(iset(3, ot), iset(258, rec, rec)), "e")
    assert len(res.records) == 2
    r = res.records[0]
    assert r.is_options and r.scope == ("observationDomainId", "ingressInterface")
    assert r.fields == {
        "observationDomainId": 1,
        "ingressInterface": 3,
        "ignoredPacketTotalCount": 10,
        "ignoredOctetTotalCount": 1500,
    }
    assert (dec.stats.records, dec.stats.options_records, dec.stats.options_templates) == (2, 2, 1)


def test_template_withdrawal_single_all_and_six_octet_options_form() -> None:
    dec = Decoder()
    ot = otrec(300, 1, fs(149, 4), fs(41, 8))
    dec.feed(msg(iset(2, FLOW_T, trec(257, fs(8, 4))), iset(3, ot)), "e")
    assert set(dec.templates("e", 1)) == {256, 257, 300}
    # withdraw 256 only; 257 still decodes
    res = dec.feed(msg(iset(2, trec(256)), iset(257, IPv4Address("1.2.3.4").packed)), "e")
    assert set(dec.templates("e", 1)) == {257, 300}
    assert [r.fields for r in res.records] == [{"sourceIPv4Address": "1.2.3.4"}]
    # data for the withdrawn template is counted as unknown, not decoded
    res = dec.feed(msg(iset(256, flow_rec("1.1.1.1", "2.2.2.2", 1, 1, 1)), seq=1), "e")
    assert not res.records and dec.stats.unknown_template_sets == 1 and len(res.unknown_sets) == 1
    # options withdrawal written as tid, 0, 0 (6 octets), then a new options template in the same set
    new_ot = otrec(301, 1, fs(149, 4))
    dec.feed(msg(iset(3, struct.pack("!HHH", 300, 0, 0), new_ot)), "e")
    assert set(dec.templates("e", 1)) == {257, 301}
    # "withdraw all" of each kind: template id = set id
    dec.feed(msg(iset(2, trec(2))), "e")
    assert set(dec.templates("e", 1)) == {301}
    dec.feed(msg(iset(3, trec(3))), "e")
    assert dec.templates("e", 1) == {}
    assert dec.stats.templates_withdrawn == 4
    assert dec.stats.malformed == 0


def test_template_redefinition_changes_decoding() -> None:
    dec = Decoder()
    dec.feed(msg(iset(2, trec(256, fs(8, 4)))), "e")
    dec.feed(msg(iset(2, trec(256, fs(8, 4)))), "e")  # a refresh, not a redefinition
    res = dec.feed(msg(iset(2, trec(256, fs(7, 2), fs(11, 2))), iset(256, u(80, 2) + u(443, 2))), "e")
    assert res.records[0].fields == {"sourceTransportPort": 80, "destinationTransportPort": 443}
    assert dec.stats.templates_redefined == 1 and dec.stats.templates == 3


def test_padding_in_data_and_template_sets() -> None:
    dec = Decoder()
    raw = msg(iset(2, FLOW_T, pad=b"\0\0\0\0\0"), iset(256, flow_rec("1.1.1.1", "2.2.2.2", 1, 2, 3), pad=b"\0" * 20))
    res = dec.feed(raw, "e")
    assert len(res.records) == 1 and not res.malformed and dec.stats.nonzero_padding == 0
    res = dec.feed(msg(iset(256, flow_rec("1.1.1.1", "2.2.2.2", 1, 2, 3), pad=b"\0\x01\0"), seq=1), "e")
    assert len(res.records) == 1 and not res.malformed and dec.stats.nonzero_padding == 1
    assert dec.stats.gaps == 0


def test_two_odids_and_two_exporters_keep_separate_sessions() -> None:
    dec = Decoder()
    tmpl = iset(2, trec(256, fs(8, 4)))
    rec = IPv4Address("1.1.1.1").packed
    stream = [
        ("a", msg(tmpl, iset(256, rec, rec), odid=1, seq=0)),
        ("a", msg(tmpl, iset(256, rec), odid=2, seq=1000)),
        ("b", msg(tmpl, iset(256, rec, rec, rec), odid=1, seq=50)),
        ("a", msg(iset(256, rec), odid=1, seq=2)),
        ("a", msg(iset(256, rec), odid=2, seq=1001)),
        ("b", msg(iset(256, rec), odid=1, seq=53)),
        ("a", msg(iset(256, rec), odid=1, seq=3)),
    ]
    for exporter, raw in stream:
        dec.feed(raw, exporter)
    assert dec.stats.gaps == 0 and dec.stats.records == 10
    assert sorted(dec.sessions()) == [("a", 1), ("a", 2), ("b", 1)]
    # a template in one domain does not apply to another
    res = dec.feed(msg(iset(256, rec), odid=3), "a")
    assert not res.records and dec.stats.unknown_template_sets == 1


def test_sequence_gap_reported_with_expected_and_received() -> None:
    dec = Decoder()
    tmpl = iset(2, trec(256, fs(8, 4)))
    rec = IPv4Address("1.1.1.1").packed
    dec.feed(msg(tmpl, iset(256, rec, rec, rec), seq=10), "e")
    res = dec.feed(msg(iset(256, rec), seq=15), "e")
    assert [(g.expected, g.received, g.delta) for g in res.gaps] == [(13, 15, 2)]
    res = dec.feed(msg(iset(256, rec), seq=16), "e")  # resynchronised on 15 + 1
    assert not res.gaps
    res = dec.feed(msg(iset(256, rec), seq=5), "e")  # went backwards: restart or reordering
    assert [(g.expected, g.received, g.delta) for g in res.gaps] == [(17, 5, -12)]
    assert (dec.stats.gaps, dec.stats.lost_records) == (2, 2)


def test_sequence_wraps_at_two_to_the_32() -> None:
    dec = Decoder()
    tmpl = iset(2, trec(256, fs(8, 4)))
    rec = IPv4Address("1.1.1.1").packed
    dec.feed(msg(tmpl, iset(256, rec, rec, rec), seq=SEQ_MOD - 2), "e")
    assert not dec.feed(msg(iset(256, rec), seq=1), "e").gaps
    gaps = dec.feed(msg(iset(256, rec), seq=SEQ_MOD - 1), "e").gaps  # 2 expected: 2^32 - 3 behind
    assert [(g.expected, g.delta) for g in gaps] == [(2, -3)]
    dec.feed(msg(iset(256, rec, rec), seq=SEQ_MOD - 1), "x")
    gaps = dec.feed(msg(iset(256, rec), seq=4), "x").gaps  # templates unknown for "x": no expectation
    assert gaps == []
    dec.feed(msg(tmpl, iset(256, rec, rec), seq=SEQ_MOD - 1), "y")
    gaps = dec.feed(msg(iset(256, rec), seq=4), "y").gaps
    assert [(g.expected, g.received, g.delta) for g in gaps] == [(1, 4, 3)]


@pytest.mark.parametrize(
    ("count_options", "second_seq", "gaps"), [(True, 3, 0), (False, 2, 0), (True, 2, 1), (False, 3, 1)]
)
def test_count_options_choice(count_options: bool, second_seq: int, gaps: int) -> None:
    dec = Decoder(count_options=count_options)
    ot = otrec(300, 1, fs(149, 4), fs(34, 4))
    t = trec(256, fs(8, 4))
    dec.feed(msg(iset(2, t), iset(3, ot), iset(256, b"\1\1\1\1", b"\2\2\2\2"), iset(300, u(1, 4) + u(1, 4))), "e")
    dec.feed(msg(iset(256, b"\3\3\3\3"), seq=second_seq), "e")
    assert dec.stats.gaps == gaps


def test_unknown_template_data_is_counted_and_no_false_gap_follows() -> None:
    dec = Decoder()
    rec = IPv4Address("1.1.1.1").packed
    dec.feed(msg(iset(256, rec, rec), seq=0), "e")  # data before template: can't count its records
    dec.feed(msg(iset(2, trec(256, fs(8, 4))), iset(256, rec), seq=2), "e")
    res = dec.feed(msg(iset(256, rec), seq=3), "e")
    assert dec.stats.unknown_template_sets == 1 and dec.stats.gaps == 0 and len(res.records) == 1


def test_duplicate_elements_get_distinct_keys_and_back_to_back_messages() -> None:
    dec = Decoder()
    t = trec(256, fs(10, 4), fs(10, 4), fs(10, 2))
    one = msg(iset(2, t), iset(256, u(1, 4) + u(2, 4) + u(3, 2)))
    two = msg(iset(256, u(4, 4) + u(5, 4) + u(6, 2)), seq=1)
    res = dec.feed(one + two, "e")
    assert res.messages == 2
    assert [r.fields for r in res.records] == [
        {"ingressInterface": 1, "ingressInterface#2": 2, "ingressInterface#3": 3},
        {"ingressInterface": 4, "ingressInterface#2": 5, "ingressInterface#3": 6},
    ]


# --- hostile input -----------------------------------------------------------------------------

GOOD = msg(iset(2, FLOW_T), iset(256, flow_rec("9.9.9.9", "8.8.8.8", 1, 1, 1)))


def with_length(raw: bytes, length: int) -> bytes:
    return raw[:2] + struct.pack("!H", length) + raw[4:]


MALFORMED = {
    "truncated header": b"\x00\x0a\x00\x20",
    "bad version": struct.pack("!HHIII", 9, 16, 0, 0, 0),
    "bad message length": with_length(GOOD, len(GOOD) + 1),
    "bad message length (under 16)": with_length(GOOD, 8),
    "set length < 4": msg(struct.pack("!HH", 256, 0) + b"\0" * 8),
    "set overruns message": msg(struct.pack("!HH", 256, 200) + b"\0" * 8),
    "empty set": msg(iset(2)),
    "template overruns set": msg(iset(2, struct.pack("!HH", 256, 60000) + fs(8, 4))),
    "bad scope count": msg(iset(3, otrec(300, 0, fs(149, 4)))),
    "bad scope count (more than fields)": msg(iset(3, otrec(300, 3, fs(149, 4)))),
    "bad template id": msg(iset(2, trec(17, fs(8, 4)))),
    "zero field length": msg(iset(2, trec(256, fs(8, 0), fs(12, 0)))),
    "record overruns set": msg(iset(2, trec(256, fs(82, 0xFFFF))), iset(256, b"\x09abc")),
    "reserved set id": msg(iset(7, b"\0\0\0\0")),
    "trailing octets": with_length(msg(iset(2, FLOW_T)) + b"\0\0", len(msg(iset(2, FLOW_T))) + 2),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_is_counted_with_a_reason_and_decoding_continues(case: str) -> None:
    dec = Decoder()
    res = dec.feed(MALFORMED[case], "bad")
    reason = case.split(" (", maxsplit=1)[0]
    assert [m.reason for m in res.malformed] == [reason]
    assert dec.stats.malformed == 1 and dec.stats.malformed_reasons[reason] == 1
    res = dec.feed(GOOD, "bad")
    assert [r.fields["sourceIPv4Address"] for r in res.records] == ["9.9.9.9"]


def test_absurd_templates_cost_time_linear_in_input() -> None:
    # 16,000 one-octet fields in one template, then a message of three 16,000-octet records
    t = struct.pack("!HH", 256, 16000) + fs(4, 1) * 16000
    dec = Decoder(max_template_fields=16000)
    start = time.perf_counter()
    dec.feed(msg(iset(2, t)), "e")
    res = dec.feed(msg(iset(256, b"\1" * 48000)), "e")
    assert time.perf_counter() - start < 2.0
    assert len(res.records) == 3 and len(res.records[0].fields) == 16000
    # a field count that cannot fit its set is refused before any field is read
    start = time.perf_counter()
    res = dec.feed(msg(iset(2, struct.pack("!HH", 257, 65535) + fs(4, 1) * 10)), "e")
    assert [m.reason for m in res.malformed] == ["template overruns set"]
    assert time.perf_counter() - start < 0.1


@FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    dec = Decoder()
    dec.feed(GOOD, "e")
    start = time.perf_counter()
    res = dec.feed(data, "e")
    assert time.perf_counter() - start < 0.5
    assert len(res.records) <= len(data)
    assert dec.feed(GOOD, "fresh").records  # still works afterwards


VALID = msg(
    iset(2, FLOW_T, trec(257, fs(82, 0xFFFF), fs(1, 8, 29305), fs(8, 4))),
    iset(3, otrec(300, 1, fs(149, 4), fs(41, 8))),
    iset(256, flow_rec("1.1.1.1", "2.2.2.2", 3, 4, 6), flow_rec("1.1.1.2", "2.2.2.3", 5, 6, 17)),
    iset(257, varlen(b"eth0") + u(7, 8) + b"\1\2\3\4", varlen(b"x" * 300) + u(8, 8) + b"\5\6\7\x08"),
    iset(300, u(1, 4) + u(2, 8)),
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    raw = bytearray(VALID)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["set", "u16", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "set" and raw:
            raw[pos] = draw(st.integers(0, 255))
        elif op == "u16" and len(raw) >= 2:
            pos = min(pos, len(raw) - 2)
            raw[pos : pos + 2] = struct.pack("!H", draw(st.sampled_from([0, 1, 3, 4, 5, 255, 256, 0x8000, 0xFFFF])))
        elif op == "cut":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del raw[pos : pos + draw(st.integers(1, 8))]
    return bytes(raw)


@FUZZ
@given(mutated(), st.booleans())
def test_mutated_valid_messages_never_raise(data: bytes, primed: bool) -> None:
    dec = Decoder(count_options=primed)
    if primed:
        dec.feed(VALID, "e")
    start = time.perf_counter()
    res = dec.feed(data, "e")
    dec.feed(data, "e")
    assert time.perf_counter() - start < 0.5
    assert len(res.records) <= len(data)
    assert dec.stats.messages + dec.stats.malformed >= 1


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.integers(0, 0xFFFF),
            st.sampled_from([0, 1, 2, 3, 4, 6, 8, 16, 0xFFFF]),
            st.sampled_from([0, 0, 29305, 7]),
        ),
        min_size=1,
        max_size=12,
    ),
    st.binary(max_size=600),
)
def test_random_templates_with_random_data_never_raise(fields: list[tuple[int, int, int]], body: bytes) -> None:
    t = trec(256, *(fs(eid & 0x7FFF, ln, pen) for eid, ln, pen in fields))
    dec = Decoder()
    res = dec.feed(msg(iset(2, t), iset(256, body) if body else b""), "e")
    for rec in res.records:
        assert len(rec.fields) == len(fields)


TYPES = sorted(
    {
        "unsigned8",
        "unsigned16",
        "unsigned32",
        "unsigned64",
        "signed8",
        "signed16",
        "signed32",
        "signed64",
        "float32",
        "float64",
        "boolean",
        "dateTimeSeconds",
        "dateTimeMilliseconds",
        "dateTimeMicroseconds",
        "ipv4Address",
        "ipv6Address",
        "macAddress",
        "string",
        "octetArray",
    }
)


def same(a: Any, b: Any) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


@FAST
@given(st.lists(st.tuples(st.sampled_from(TYPES), st.integers(1, 9)), min_size=1, max_size=10), st.data())
def test_struct_fast_path_matches_field_by_field_conversion(spec: list[tuple[str, int]], data: st.DataObject) -> None:
    extra = {(TEST_PEN, 100 + i): ElementInfo(f"f{i}", ty) for i, (ty, _) in enumerate(spec)}
    t = trec(256, *(fs(100 + i, ln, TEST_PEN) for i, (_, ln) in enumerate(spec)))
    reclen = sum(ln for _, ln in spec)
    body = data.draw(st.binary(min_size=reclen, max_size=reclen))
    res = Decoder(extra_elements=extra).feed(msg(iset(2, t), iset(256, body)), "e")
    (rec,) = res.records
    pos = 0
    for i, (ty, ln) in enumerate(spec):
        assert same(rec.fields[f"f{i}"], converter_for(ty)(body[pos : pos + ln])), (ty, ln)
        pos += ln


def test_sessions_are_bounded() -> None:
    dec = Decoder(max_sessions=2)
    for odid in (1, 2, 1, 3):
        dec.feed(msg(iset(2, trec(256, fs(8, 4))), odid=odid), "e")
    assert dec.sessions() == [("e", 1), ("e", 3)] and dec.stats.sessions_evicted == 1


# --- bounded template state --------------------------------------------------------------------

SRC = IPv4Address("1.1.1.1").packed


def wide(tid: int, n: int) -> bytes:
    """A template of ``n`` one-octet elements the registry does not know: the costliest kind to hold."""
    return trec(tid, *(fs(1000 + i, 1) for i in range(n)))


def one_template_cost(nfields: int = 1) -> int:
    probe = Decoder()
    probe.feed(msg(iset(2, wide(256, nfields))), "probe")
    cost: int = probe.template_bytes
    assert cost > 0
    return cost


def test_templates_per_session_are_bounded_and_redefinitions_still_accepted() -> None:
    dec = Decoder()
    res = dec.feed(msg(iset(2, *(trec(tid, fs(8, 4)) for tid in range(256, 256 + 4100)))), "e")
    assert len(dec.templates("e", 1)) == 4096
    assert dec.stats.templates_refused == dec.stats.templates_refused_session == 4
    assert [(h.limit, h.counter) for h in res.limits] == [
        ("max_templates_per_session", "templates_refused_session")
    ] * 4
    assert "4352" in res.limits[0].dropped and not res.malformed
    assert dec.feed(msg(iset(2, trec(256, fs(8, 4))), odid=2), "e").limits == []  # another session, its own allowance

    small = Decoder(max_templates_per_session=2)
    small.feed(msg(iset(2, trec(256, fs(8, 4)), trec(257, fs(8, 4)), trec(258, fs(8, 4)))), "e")
    assert set(small.templates("e", 1)) == {256, 257}
    res = small.feed(msg(iset(2, trec(257, fs(7, 2)), trec(258, fs(8, 4))), iset(257, u(80, 2)), iset(258, SRC)), "e")
    assert [r.fields for r in res.records] == [{"sourceTransportPort": 80}]  # the redefinition was accepted
    assert len(res.unknown_sets) == 1 and small.stats.templates_refused_session == 2
    small.feed(msg(iset(2, trec(256), trec(258, fs(8, 4)))), "e")  # a withdrawal makes room
    assert set(small.templates("e", 1)) == {257, 258}


def test_fields_per_template_are_bounded_and_the_set_continues() -> None:
    dec = Decoder()
    res = dec.feed(msg(iset(2, wide(256, 513), wide(257, 512), trec(258, fs(8, 4))), iset(258, SRC)), "e")
    assert set(dec.templates("e", 1)) == {257, 258}
    assert [r.fields for r in res.records] == [{"sourceIPv4Address": "1.1.1.1"}]
    assert dec.stats.templates_refused_fields == dec.stats.templates_refused == 1 and not res.malformed
    ((hit),) = res.limits
    assert (hit.exporter, hit.odid, hit.limit) == ("e", 1, "max_template_fields") and "513" in hit.dropped
    # a redefinition over the limit also removes the earlier definition: no data decoded with a stale layout
    res = dec.feed(msg(iset(2, trec(258, *[fs(8, 4)] * 513)), iset(258, SRC), seq=1), "e")
    assert not res.records and len(res.unknown_sets) == 1 and 258 not in dec.templates("e", 1)
    assert dec.template_bytes == one_template_cost(512)
    # a refused template's field list is still checked against its set
    res = Decoder(max_template_fields=1).feed(msg(iset(2, struct.pack("!HH", 256, 2) + fs(1, 8, 29305))), "e")
    assert [m.reason for m in res.malformed] == ["template overruns set"] and not res.limits


def test_template_memory_budget_is_decoder_wide_and_given_back() -> None:
    unit = one_template_cost(10)
    dec = Decoder(max_template_bytes=3 * unit)
    dec.feed(msg(iset(2, wide(256, 10), wide(257, 10))), "a")
    res = dec.feed(msg(iset(2, wide(256, 10), wide(257, 10))), "b")  # the budget spans sessions
    assert set(dec.templates("b", 1)) == {256}
    assert dec.template_bytes == 3 * unit and dec.stats.templates_refused_budget == dec.stats.templates_refused == 1
    assert [(h.exporter, h.limit, h.counter) for h in res.limits] == [
        ("b", "max_template_bytes", "templates_refused_budget")
    ]
    dec.feed(msg(iset(2, wide(256, 10))), "a")  # a refresh costs nothing
    assert dec.template_bytes == 3 * unit and dec.stats.templates_refused == 1
    dec.feed(msg(iset(2, trec(256))), "a")  # a withdrawal gives its share back
    assert dec.template_bytes == 2 * unit
    dec.feed(msg(iset(2, wide(257, 10))), "b")
    assert set(dec.templates("b", 1)) == {256, 257} and dec.template_bytes == 3 * unit
    # a redefinition pays only the difference; one that does not fit drops the old definition too
    dec.feed(msg(iset(2, wide(257, 5))), "b")
    assert dec.template_bytes < 3 * unit and len(dec.templates("b", 1)[257].fields) == 5
    dec.feed(msg(iset(2, wide(257, 400))), "b")
    assert 257 not in dec.templates("b", 1) and dec.template_bytes == 2 * unit
    assert dec.stats.templates_refused_budget == 2


def test_session_eviction_gives_back_template_memory_and_is_reported() -> None:
    dec = Decoder(max_sessions=2)
    t = iset(2, trec(256, fs(8, 4)), trec(257, fs(8, 4)))
    dec.feed(msg(t, odid=1), "a")
    dec.feed(msg(t, odid=2), "a")
    held = dec.template_bytes
    res = dec.feed(msg(t, odid=3), "b")
    assert dec.template_bytes == held and dec.sessions() == [("a", 2), ("b", 3)]
    ((hit),) = res.limits
    assert (hit.exporter, hit.odid, hit.limit, hit.counter) == ("a", 1, "max_sessions", "sessions_evicted")
    assert "2 templates" in hit.dropped
    dec.feed(msg(iset(256, SRC), odid=4), "c")  # a session with no templates pushes one out too
    assert dec.template_bytes == held // 2 and dec.stats.sessions_evicted == 2


def test_templates_expire_when_not_refreshed_within_the_lifetime() -> None:
    dec = Decoder(template_lifetime=100)
    tmpl = iset(2, trec(256, fs(8, 4)))
    data = iset(256, SRC)
    dec.feed(msg(tmpl, data), "e", now=1000)
    assert dec.feed(msg(data, seq=1), "e", now=1090).records
    dec.feed(msg(tmpl, seq=2), "e", now=1090)  # refreshed
    assert dec.feed(msg(data, seq=2), "e", now=1180).records
    assert dec.feed(msg(data, seq=3), "e").records  # no clock: time stands still
    res = dec.feed(msg(data, seq=4), "e", now=1191)
    assert not res.records and len(res.unknown_sets) == 1 and dec.stats.unknown_template_sets == 1
    assert dec.templates("e", 1) == {} and dec.template_bytes == 0 and dec.stats.templates_expired == 1
    assert [(h.exporter, h.limit, h.counter) for h in res.limits] == [("e", "template_lifetime", "templates_expired")]
    # expiry is decoder-wide: a silent exporter's templates go while another one is fed
    dec.feed(msg(tmpl), "quiet", now=2000)
    dec.feed(msg(tmpl), "busy", now=1500)  # a clock going back is taken as standing still
    dec.feed(msg(data), "busy", now=2101)
    assert dec.templates("quiet", 1) == {} and dec.templates("busy", 1) == {} and dec.stats.templates_expired == 3
    # without a lifetime (the default, right for streams) nothing expires whatever the clock says
    forever = Decoder()
    forever.feed(msg(tmpl), "e", now=0)
    assert forever.feed(msg(data), "e", now=1e9).records and forever.stats.templates_expired == 0


def test_withdrawals_can_be_ignored_as_udp_requires() -> None:
    dec = Decoder(withdrawals=False)
    dec.feed(msg(iset(2, FLOW_T), iset(3, otrec(300, 1, fs(149, 4), fs(41, 8)))), "e")
    res = dec.feed(
        msg(
            iset(2, trec(256), trec(2)),
            iset(3, struct.pack("!HHH", 300, 0, 0)),
            iset(256, flow_rec("1.1.1.1", "2.2.2.2", 1, 1, 1)),
        ),
        "e",
    )
    assert set(dec.templates("e", 1)) == {256, 300} and len(res.records) == 1
    assert dec.stats.withdrawals_ignored == 3 and dec.stats.templates_withdrawn == 0 and not res.malformed
    assert {(h.limit, h.counter) for h in res.limits} == {("withdrawals", "withdrawals_ignored")}
    assert [m.reason for m in dec.feed(msg(iset(2, trec(17))), "e").malformed] == ["bad template id"]


@FUZZ
@given(st.lists(st.tuples(mutated(), st.integers(0, 3), st.floats(0, 8)), min_size=1, max_size=5), st.booleans())
def test_tight_limits_hold_and_the_accounting_stays_exact(feeds: list[tuple[bytes, int, float]], udp: bool) -> None:
    from collectors.decoder import template_cost  # here, so the other tests run (and fail) on a decoder without it

    dec = Decoder(
        max_sessions=2,
        max_templates_per_session=2,
        max_template_fields=3,
        max_template_bytes=2 * template_cost(3),
        template_lifetime=10 if udp else None,
        withdrawals=not udp,
    )
    now = 0.0
    for data, exporter, step in feeds:
        now += step
        dec.feed(VALID, f"e{exporter}", now=now)
        dec.feed(data, f"e{exporter}", now=now)
        held = [t for key in dec.sessions() for t in dec.templates(*key).values()]
        assert dec.template_bytes == sum(template_cost(len(t.fields)) for t in held) <= dec.max_template_bytes
        assert all(len(t.fields) <= 3 for t in held) and len(dec.sessions()) <= 2
        assert all(len(dec.templates(*key)) <= 2 for key in dec.sessions())
    s = dec.stats
    assert s.templates_refused == s.templates_refused_session + s.templates_refused_fields + s.templates_refused_budget


def test_template_flood_memory_stays_within_the_budget() -> None:
    """20 datagrams of 62 KB, each 31 templates of 512 unknown one-octet elements (~95 MB without limits)."""
    grams = [msg(iset(2, *(wide(256 + 31 * g + i, 512) for i in range(31)))) for g in range(20)]
    assert all(63_000 < len(g) <= 65_507 for g in grams)  # fits a UDP datagram
    dec = Decoder()
    dec.feed(GOOD, "warm-up")
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for g in grams:
            dec.feed(g, "attacker")
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert growth < 20_000_000, f"{growth / 1e6:.1f} MB"
    assert dec.template_bytes <= dec.max_template_bytes == 16 << 20
    assert growth <= dec.template_bytes  # the accounting is an upper bound of what the templates hold
    assert dec.stats.templates_refused_budget > 0
