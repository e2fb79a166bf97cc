"""The IPFIX encoder against RFC 7011 and an independent decoder (the `ipfix` package).

Wire structure is checked with a small struct-based parser (tests/unit/wire.py);
record contents are checked by decoding with ipfix.message.MessageBuffer,
one decoder session per stream so templates must come from earlier messages.
"""

from __future__ import annotations

import struct
from datetime import datetime, timedelta
from ipaddress import ip_address
from typing import Any

import ipfix.message
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from exporter.ipfix import FLOW_V4, FLOW_V6, Encoder, Field, Template, ie
from exporter.records import FLOW_RECORD, Records
from tests.unit.wire import RECLEN, parse
from tools.synthetic import random_records

SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
U32 = 1 << 32
NOW = 1_700_000_000.0
ALL_TEMPLATES = Encoder().templates
TEMPLATE_IDS = [t.template_id for t in ALL_TEMPLATES]
# Both template sets (data and options), as every template refresh carries them.
TEMPLATE_BYTES = len(Encoder().templates_message(1.0)) - 16
# The ipfix decoder turns milliseconds into datetimes, which end in year 9999.
MAX_MS = 250_000_000_000_000
EPOCH = datetime(1970, 1, 1)

# IANA element ids, from the RFC 7012 registry (an oracle for the template, not used by the encoder).
IANA_IDS = {
    "sourceIPv4Address": 8, "destinationIPv4Address": 12, "sourceIPv6Address": 27, "destinationIPv6Address": 28,
    "sourceTransportPort": 7, "destinationTransportPort": 11, "protocolIdentifier": 4, "ingressInterface": 10,
    "egressInterface": 14, "flowDirection": 61, "vlanId": 58, "ipClassOfService": 5, "tcpControlBits": 6,
    "icmpTypeCodeIPv4": 32, "icmpTypeCodeIPv6": 139,
    "minimumTTL": 52, "maximumTTL": 53, "packetDeltaCount": 2, "octetDeltaCount": 1,
    "flowStartMilliseconds": 152, "flowEndMilliseconds": 153, "flowEndReason": 136,
}


def has_templates(raw: bytes) -> bool:
    ids = [sid for sid, _ in parse(raw).sets if sid < 256]
    # One Template Set, then one Options Template Set per options template (nfacctd needs that).
    assert ids in ([], [2] + [3] * len(Encoder().options_templates)), "data and options templates travel together"
    return bool(ids)


# --- record strategies and the decoder oracle -------------------------------------------------

@st.composite
def flow_records(draw: st.DrawFn, max_size: int = 40) -> Records:
    n = draw(st.integers(0, max_size))
    recs = np.zeros(n, dtype=FLOW_RECORD)
    versions = draw(hnp.arrays(np.uint8, n, elements=st.sampled_from([4, 6])))
    recs["ip_version"] = versions
    for name in ("src_addr", "dst_addr"):
        addr = draw(hnp.arrays(np.uint8, (n, 16)))
        v4 = versions == 4
        addr[v4, :10] = 0
        addr[v4, 10:12] = 0xFF
        recs[name] = addr
    recs["protocol"] = draw(hnp.arrays(np.uint8, n, elements=st.one_of(
        st.sampled_from([1, 6, 17, 58]), st.integers(0, 255))))
    for name, dtype in (("src_port", np.uint16), ("dst_port", np.uint16), ("ifindex", np.uint32),
                        ("vlan_id", np.uint16), ("packets", np.uint64), ("octets", np.uint64),
                        ("tcp_flags", np.uint16), ("tos", np.uint8), ("min_ttl", np.uint8),
                        ("max_ttl", np.uint8), ("end_reason", np.uint8)):
        recs[name] = draw(hnp.arrays(dtype, n))
    for name in ("first_ms", "last_ms"):
        recs[name] = draw(hnp.arrays(np.uint64, n, elements=st.integers(0, MAX_MS)))
    recs["direction"] = draw(hnp.arrays(np.uint8, n, elements=st.sampled_from([0, 1])))
    return recs


def expected_record(rec: Any) -> dict[str, Any]:
    v4 = int(rec["ip_version"]) == 4
    family = "IPv4" if v4 else "IPv6"

    def addr(a: Any) -> Any:
        return ip_address(bytes(a[12:16] if v4 else a))

    icmp = int(rec["dst_port"]) if int(rec["protocol"]) == (1 if v4 else 58) else 0
    return {
        f"source{family}Address": addr(rec["src_addr"]),
        f"destination{family}Address": addr(rec["dst_addr"]),
        "sourceTransportPort": int(rec["src_port"]),
        "destinationTransportPort": int(rec["dst_port"]),
        "protocolIdentifier": int(rec["protocol"]),
        "ingressInterface": int(rec["ifindex"]) if int(rec["direction"]) == 0 else 0,
        "egressInterface": int(rec["ifindex"]) if int(rec["direction"]) == 1 else 0,
        "flowDirection": int(rec["direction"]),
        "vlanId": int(rec["vlan_id"]),
        "ipClassOfService": int(rec["tos"]),
        "tcpControlBits": int(rec["tcp_flags"]),
        f"icmpTypeCode{family}": icmp,
        "minimumTTL": int(rec["min_ttl"]),
        "maximumTTL": int(rec["max_ttl"]),
        "packetDeltaCount": int(rec["packets"]),
        "octetDeltaCount": int(rec["octets"]),
        "flowStartMilliseconds": int(rec["first_ms"]),
        "flowEndMilliseconds": int(rec["last_ms"]),
        "flowEndReason": int(rec["end_reason"]),
    }


def expected_order(recs: Records) -> list[dict[str, Any]]:
    """The documented order: IPv4 records, then IPv6 records, each in input order."""
    ordered = np.concatenate([recs[recs["ip_version"] == 4], recs[recs["ip_version"] == 6]])
    return [expected_record(r) for r in ordered]


class Decoder:
    """One collector session of the independent decoder."""

    def __init__(self) -> None:
        self.buf = ipfix.message.MessageBuffer()

        def unknown(_buf: Any, _set: Any) -> None:
            raise AssertionError("data set before its template")

        self.buf.unknown_data_set_hook = unknown

    def decode(self, raw: bytes) -> list[dict[str, Any]]:
        self.buf.from_bytes(raw)
        out = []
        for rec in self.buf.namedict_iterator():
            for key in ("flowStartMilliseconds", "flowEndMilliseconds"):
                rec[key] = round((rec[key] - EPOCH) / timedelta(milliseconds=1))
            out.append(rec)
        return out


# --- round trip -------------------------------------------------------------------------------

@SETTINGS
@given(batches=st.lists(flow_records(), min_size=1, max_size=4),
       mtu=st.sampled_from([560, 600, 1400, 9000]) | st.integers(560, 2000),
       odid=st.integers(0, U32 - 1))
def test_round_trip_through_independent_decoder(batches: list[Records], mtu: int, odid: int) -> None:
    enc = Encoder(odid=odid, mtu=mtu, template_refresh_s=1e9, template_refresh_messages=10**6)
    dec = Decoder()
    for i, recs in enumerate(batches):
        decoded = []
        for raw in enc.encode(recs, NOW + i):
            decoded.extend(dec.decode(raw))
            assert dec.buf.odid == odid
        assert decoded == expected_order(recs)


@given(recs=flow_records(max_size=40))
@SETTINGS
def test_record_elements_are_what_the_data_record_carries(recs: Records) -> None:
    """dump --json names a record's elements as the wire does: the independent expectation, less the
    elements a condition zeroes (the other hook's interface, ICMP type of a non-ICMP flow, no end)."""
    from exporter.ipfix.encoder import record_elements

    for rec in recs:
        want = {k: str(v) if k.endswith("Address") else v for k, v in expected_record(rec).items()}
        icmp = int(rec["protocol"]) == (1 if int(rec["ip_version"]) == 4 else 58)
        absent = {"egressInterface" if int(rec["direction"]) == 0 else "ingressInterface",
                  *([] if icmp else [k for k in want if k.startswith("icmpTypeCode")]),
                  *([] if int(rec["end_reason"]) else ["flowEndReason"])}
        assert record_elements(rec) == {k: v for k, v in want.items() if k not in absent}


def test_icmp_type_code_and_ports() -> None:
    recs = np.zeros(4, dtype=FLOW_RECORD)
    recs["ip_version"] = [4, 6, 4, 6]
    recs["protocol"] = [1, 58, 58, 1]
    recs["dst_port"] = [0x0800, 0x8000, 0x0303, 0x0101]
    recs["src_addr"][[0, 2], 10:12] = 0xFF
    recs["src_addr"][0, 12:] = [192, 0, 2, 1]
    got = [r for raw in Encoder().encode(recs, NOW) for r in Decoder().decode(raw)]
    assert [r.get("icmpTypeCodeIPv4", r.get("icmpTypeCodeIPv6")) for r in got] == [0x0800, 0, 0x8000, 0]
    assert [r["destinationTransportPort"] for r in got] == [0x0800, 0x0303, 0x8000, 0x0101]
    assert [r["sourceTransportPort"] for r in got] == [0, 0, 0, 0]
    assert got[0]["sourceIPv4Address"] == ip_address("192.0.2.1")


def test_templates_use_registry_elements_at_native_lengths() -> None:
    dec = Decoder()
    dec.decode(Encoder(odid=7).templates_message(NOW))
    for tid, family in ((256, "IPv4"), (257, "IPv6")):
        tmpl = dec.buf.templates[(7, tid)]
        names = [e.name for e in tmpl.ies]
        assert names == [f.name for f in (FLOW_V4 if tid == 256 else FLOW_V6).fields]
        assert {f"source{family}Address", f"icmpTypeCode{family}", "flowStartMilliseconds"} <= set(names)
        assert [(e.pen, e.num) for e in tmpl.ies] == [(0, IANA_IDS[n]) for n in names]
        lengths = {e.name: e.length for e in tmpl.ies}
        assert lengths[f"source{family}Address"] == (4 if family == "IPv4" else 16)
        assert lengths["flowEndMilliseconds"] == 8
        assert lengths["octetDeltaCount"] == 8
        assert sum(lengths.values()) == RECLEN[tid]


# --- message structure ------------------------------------------------------------------------

@SETTINGS
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1), share=st.sampled_from([0.0, 0.3, 1.0]),
       mtu=st.integers(560, 65535) | st.sampled_from([560, 1400, 1500, 65535]),
       odid=st.integers(0, U32 - 1), now=st.floats(0, U32 - 1, exclude_max=True))
def test_messages_fit_mtu_and_are_well_formed(n: int, seed: int, share: float, mtu: int, odid: int,
                                              now: float) -> None:
    recs = random_records(n, seed=seed, ipv6_share=share)
    out = Encoder(odid=odid, mtu=mtu).encode(recs, now)
    msgs = [parse(raw) for raw in out]
    known: set[int] = set()
    per_template = {256: 0, 257: 0}
    for i, msg in enumerate(msgs):
        assert msg.length <= mtu
        assert msg.export_time == int(now)
        assert msg.odid == odid
        assert msg.data_records > 0
        for set_id, body in msg.sets:
            if set_id in (2, 3):
                known.update(msg.template_ids())
            else:
                assert set_id in known, "data set before its template"
                per_template[set_id] += len(body) // RECLEN[set_id]
        if i + 1 < len(msgs):
            # Greedy fill: a message is closed only when the next record's set would not fit.
            next_tid = msgs[i + 1].data_sets()[0][0]
            assert mtu - msg.length < 4 + RECLEN[next_tid]
    assert known == set(TEMPLATE_IDS)
    assert msgs[0].sets[0][0] == 2
    assert per_template == {256: int((recs["ip_version"] == 4).sum()), 257: int((recs["ip_version"] == 6).sum())}
    # IPv4 records first, then IPv6: each family is contiguous across the stream.
    order = [sid for m in msgs for sid, _ in m.data_sets()]
    assert order == sorted(order)


def test_large_batch_content() -> None:
    recs = random_records(20_000, seed=3, ipv6_share=0.4)
    dec = Decoder()
    got = [r for raw in Encoder(mtu=1500).encode(recs, NOW) for r in dec.decode(raw)]
    want = expected_order(recs)
    assert len(got) == len(want)
    for i in range(0, len(want), 997):
        assert got[i] == want[i]
    assert got[-1] == want[-1]


def test_message_exactly_at_mtu() -> None:
    # Header 16 + template sets + set header 4 + 10 IPv4 records fills the MTU to the byte.
    mtu = 16 + TEMPLATE_BYTES + 4 + 10 * RECLEN[256]
    per_message = (mtu - 20) // RECLEN[256]
    out = Encoder(mtu=mtu).encode(random_records(10 + 2 * per_message + 3, ipv6_share=0.0), NOW)
    assert len(out[0]) == mtu
    assert [parse(m).data_records for m in out] == [10, per_message, per_message, 3]
    assert [len(m) for m in out[1:]] == [20 + parse(m).data_records * RECLEN[256] for m in out[1:]]


@pytest.mark.parametrize("left", range(RECLEN[257] - 2, RECLEN[257] + 7))
def test_family_switch_at_the_edge_of_a_message(left: int) -> None:
    # 5 IPv4 records leave `left` bytes: an IPv6 set needs a set header and one record, else a new message.
    mtu = 16 + TEMPLATE_BYTES + 4 + 5 * RECLEN[256] + left
    recs = random_records(8, ipv6_share=0.0)
    recs["ip_version"][5:] = 6
    msgs = [parse(m) for m in Encoder(mtu=mtu).encode(recs, NOW)]
    if left >= 4 + RECLEN[257]:
        assert msgs[0].data_sets() == [(256, 5), (257, 1)]
        assert msgs[0].length == mtu - left + 4 + RECLEN[257]
    else:
        assert msgs[0].data_sets() == [(256, 5)]
        assert msgs[1].data_sets()[0][0] == 257
    assert sum(m.data_records for m in msgs) == 8


# --- sequence numbers -------------------------------------------------------------------------

@SETTINGS
@given(start=st.integers(U32 - 5000, U32 - 1) | st.integers(0, U32 - 1),
       sizes=st.lists(st.integers(0, 1500), min_size=1, max_size=6),
       template_only=st.lists(st.booleans(), min_size=6, max_size=6),
       mtu=st.sampled_from([560, 1400, 9000, 65535]))
def test_sequence_numbers_count_data_records_and_wrap(start: int, sizes: list[int], template_only: list[bool],
                                                      mtu: int) -> None:
    enc = Encoder(mtu=mtu, sequence=start)
    assert enc.sequence == start
    sent = 0
    for i, n in enumerate(sizes):
        if template_only[i]:
            msg = parse(enc.templates_message(NOW + i))
            assert msg.sequence == (start + sent) % U32
            assert msg.data_records == 0
            assert msg.template_ids() == TEMPLATE_IDS
            assert enc.sequence == (start + sent) % U32
        for raw in enc.encode(random_records(n, seed=i), NOW + i):
            msg = parse(raw)
            assert msg.sequence == (start + sent) % U32
            sent += msg.data_records
        assert sent == sum(sizes[:i + 1])
        assert enc.sequence == (start + sent) % U32


def test_sequence_wraps_inside_one_batch() -> None:
    first = (1400 - 16 - TEMPLATE_BYTES - 4) // RECLEN[256]  # the first message also carries the templates
    per = (1400 - 20) // RECLEN[256]
    back = first + 3  # the counter wraps between the 2nd and 3rd message
    enc = Encoder(sequence=U32 - back)
    seqs = [parse(raw).sequence for raw in enc.encode(random_records(first + 3 * per, ipv6_share=0.0), NOW)]
    starts = [0, first, first + per, first + 2 * per]
    assert seqs == [(U32 - back + n) % U32 for n in starts]
    assert first < back < first + per
    assert enc.sequence == first + 3 * per - back


# --- template refresh -------------------------------------------------------------------------

@SETTINGS
@given(refresh=st.integers(1, 10_000), t0=st.integers(0, 2**31), early=st.integers(0, 10_000))
def test_template_refresh_by_time(refresh: int, t0: int, early: int) -> None:
    enc = Encoder(template_refresh_s=refresh, template_refresh_messages=10**6)
    recs = random_records(200, ipv6_share=0.5)
    first = enc.encode(recs, t0)
    assert [has_templates(m) for m in first] == [True] + [False] * (len(first) - 1)
    before = t0 + min(early, refresh - 1)
    assert not any(has_templates(m) for m in enc.encode(recs, before))
    due = enc.encode(recs, t0 + refresh + early)
    assert [has_templates(m) for m in due] == [True] + [False] * (len(due) - 1)
    assert not any(has_templates(m) for m in enc.encode(recs, t0 + refresh + early))
    # A clock stepped backwards sends them again rather than waiting to catch up.
    assert has_templates(enc.encode(recs, t0 + early)[0])


@SETTINGS
@given(every=st.integers(1, 12), sizes=st.lists(st.integers(0, 300), min_size=1, max_size=5),
       reset_at=st.integers(0, 5))
def test_template_refresh_by_message_count(every: int, sizes: list[int], reset_at: int) -> None:
    enc = Encoder(mtu=560, template_refresh_s=1e9, template_refresh_messages=every)
    flags = []
    expected = []
    since = None  # messages since templates were last sent, None when they are due
    for i, n in enumerate(sizes):
        if i == reset_at:
            enc.reset_templates()
            since = None
        for raw in enc.encode(random_records(n, seed=i), NOW):
            flags.append(has_templates(raw))
            due = since is None or since >= every
            expected.append(due)
            since = 1 if due else since + 1  # type: ignore[operator]
    assert flags == expected
    assert not flags or flags[0]


def test_template_refresh_counts_template_only_messages() -> None:
    enc = Encoder(mtu=560, template_refresh_s=1e9, template_refresh_messages=3)
    enc.templates_message(NOW)
    out = enc.encode(random_records(60, ipv6_share=0.0), NOW)
    assert len(out) >= 6
    assert [has_templates(m) for m in out] == [i % 3 == 2 for i in range(len(out))]


def test_reset_templates() -> None:
    enc = Encoder(template_refresh_s=1e9, template_refresh_messages=10**6)
    recs = random_records(10)
    assert has_templates(enc.encode(recs, NOW)[0])
    assert not has_templates(enc.encode(recs, NOW)[0])
    enc.reset_templates()
    assert [has_templates(m) for m in enc.encode(recs, NOW)] == [True]
    assert not has_templates(enc.encode(recs, NOW)[0])


def test_templates_message_contents() -> None:
    enc = Encoder(odid=42, sequence=17)
    msg = parse(enc.templates_message(NOW + 0.75))
    assert (msg.odid, msg.sequence, msg.export_time) == (42, 17, int(NOW))
    assert msg.template_ids() == TEMPLATE_IDS
    assert [sid for sid, _ in msg.sets] == [2] + [3] * len(enc.options_templates)
    # Templates just went out, so the next data message does not repeat them.
    assert not has_templates(enc.encode(random_records(5), NOW + 1)[0])


# --- zero records and validation -------------------------------------------------------------

def test_zero_records_give_no_messages_and_keep_state() -> None:
    enc = Encoder(sequence=5, template_refresh_s=10)
    assert enc.encode(np.zeros(0, dtype=FLOW_RECORD), NOW) == []
    assert enc.sequence == 5
    # The templates were not sent by the empty call, so the first real message still carries them.
    assert has_templates(enc.encode(random_records(3), NOW + 1)[0])
    assert enc.encode(np.zeros(0, dtype=FLOW_RECORD), NOW + 100) == []
    assert has_templates(enc.encode(random_records(3), NOW + 101)[0])


@pytest.mark.parametrize("mtu", [0, 511, 65536, 100_000])
def test_mtu_out_of_range(mtu: int) -> None:
    with pytest.raises(ValueError):
        Encoder(mtu=mtu)


@pytest.mark.parametrize("mtu", [560, 65535])
def test_mtu_bounds_accepted(mtu: int) -> None:
    out = Encoder(mtu=mtu).encode(random_records(2000), NOW)
    assert max(len(m) for m in out) <= mtu


@pytest.mark.parametrize("kwargs", [{"odid": -1}, {"odid": U32}, {"sequence": U32}, {"sequence": -1},
                                    {"template_refresh_messages": 0}, {"template_refresh_s": -1.0}])
def test_invalid_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Encoder(**kwargs)


def test_rejects_bad_input_without_changing_state() -> None:
    enc = Encoder(sequence=9)
    with pytest.raises(TypeError):
        enc.encode(np.zeros(3, dtype=[("a", "u1")]), NOW)
    bad = random_records(5)
    bad["ip_version"][2] = 5
    with pytest.raises(ValueError):
        enc.encode(bad, NOW)
    with pytest.raises(ValueError):
        enc.encode(random_records(5), -1.0)
    with pytest.raises(ValueError):
        enc.encode(random_records(5), float(U32))
    assert enc.sequence == 9
    assert has_templates(enc.encode(random_records(5), NOW)[0])


def test_non_contiguous_input() -> None:
    recs = random_records(40, ipv6_share=0.5)
    dec = Decoder()
    got = [r for raw in Encoder().encode(recs[::3], NOW) for r in dec.decode(raw)]
    assert got == expected_order(recs[::3])


# --- templates --------------------------------------------------------------------------------

def test_template_validation() -> None:
    with pytest.raises(ValueError):
        Template.from_names(255, ["octetDeltaCount"])
    with pytest.raises(ValueError):
        Template.from_names(300, ["octetDeltaCount", "octetDeltaCount"], keys=["octetDeltaCount"])
    with pytest.raises(ValueError):
        Template.from_names(300, ["sourceIPv4Address", "interfaceName"], keys=["sourceIPv4Address"])
    with pytest.raises(ValueError):
        Template.from_names(300, ["noSuchElement"])
    with pytest.raises(ValueError):
        Template(300, (Field(ie("sourceIPv4Address"), 2),))
    with pytest.raises(ValueError):
        Template.from_names(300, ["octetDeltaCount"], scope_count=2)


def test_a_template_may_repeat_an_element() -> None:
    """RFC 7011 4.2/4.3 windows and RFC 5476 selector lists repeat elements; numpy names them name#n."""
    tmpl = Template.from_names(300, ["observationDomainId", "observationTimeMilliseconds",
                                     "observationTimeMilliseconds", "observationTimeMilliseconds"], scope_count=1)
    assert tmpl.keys == ("observationDomainId", "observationTimeMilliseconds", "observationTimeMilliseconds#2",
                         "observationTimeMilliseconds#3")
    assert tmpl.names.count("observationTimeMilliseconds") == 3
    assert tmpl.record_length == 4 + 3 * 8
    assert tmpl.template_record() == struct.pack("!HHH", 300, 4, 1) + struct.pack("!HH", 149, 4) \
        + struct.pack("!HH", 323, 8) * 3


def test_variable_length_fields_in_options_templates() -> None:
    tmpl = Template.from_names(300, ["ingressInterface", "interfaceName"], scope_count=1)
    assert tmpl.variable and tmpl.template_record()[-4:] == struct.pack("!HH", 82, 0xFFFF)
    with pytest.raises(ValueError, match="variable-length"):
        _ = tmpl.record_length


def test_options_template_record_and_reduced_size() -> None:
    tmpl = Template(400, (Field(ie("observationDomainId"), 4), Field(ie("octetDeltaCount"), 4)), scope_count=1)
    assert tmpl.set_id == 3
    assert tmpl.template_record() == struct.pack("!HHH", 400, 2, 1) + struct.pack("!HHHH", 149, 4, 1, 4)
    assert tmpl.record_length == 8
    assert tmpl.wire_dtype["octetDeltaCount"] == np.dtype(">u4")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3000), mtu=st.integers(560, 9000))
def test_flow_counts_come_with_each_message(n: int, mtu: int) -> None:
    enc = Encoder(mtu=mtu)
    msgs = enc.encode(random_records(n), NOW)
    assert len(msgs.flows) == len(msgs)
    assert [enc.flow_totals(m).flows for m in msgs] == msgs.flows
    assert sum(msgs.flows) == n
    assert enc.encode(random_records(0), NOW + 1).flows == []   # nothing to send: no stale counts


def test_templates_for_a_queue_take_the_header_of_the_message_that_follows() -> None:
    enc = Encoder(odid=7)
    queued = enc.encode(random_records(5), NOW)[0]
    later = enc.templates_message(NOW + 50, follower=queued)
    assert later[4:12] == queued[4:12]          # export time and sequence of the queued message
    assert later[12:16] == (7).to_bytes(4, "big") and later[16:] == enc.templates_message(NOW + 60)[16:]
    other = Encoder(odid=8).encode(random_records(5), NOW)[0]
    assert enc.templates_message(NOW + 50, follower=other)[4:8] == int(NOW + 50).to_bytes(4, "big")
