"""Sans-IO IPFIX (RFC 7011) encoder: FLOW_RECORD arrays and options in, messages out.

Theory of operation. `encode(records, now)` returns `Messages`: the datagrams, and for each what
it carries (`.totals`: its flow records and their packets and octets, a biflow's two directions
together), summed while the records are encoded, so a message a sender could not deliver is
accounted for without decoding it again. It splits the batch by ip_version
into the IPv4 (256) and IPv6 (257) data templates, then builds each family's
data records in one go: an array of the template's packed big-endian wire
dtype, filled column by column with whole-array assignments and viewed as
one flat byte buffer. The records of a family are then contiguous slices
of that buffer, so cutting messages is only slicing and joining.

Options (RFC 7011 section 4, RFC 5476, see options.py): `encode(records,
now, options=state)` or `encode_options(state, now)` adds one run of options
records ahead of the data records; the interface-name records (264) join it
when templates are due by time (or forced) and when the state's interfaces
differ from those last sent.

Biflows (RFC 5103): a biflow encoder also has the uniflow templates, and a
biflow with one side only goes out under them (a forward-only conversation
is a uniflow; zeros in the reverse fields would read as a reverse flow at
1970-01-01).

MTU: at most 65,535 (the message length field) and, over UDP, the largest
payload of one datagram (65,507 over IPv4, 65,527 over IPv6; `max_mtu()`);
at least `minimum_mtu()`: the header, every template set and one record.

Messages are filled greedily up to the MTU: options records first, then IPv4
records, then IPv6, each in input order; when one run ends mid-message the
next starts a new set in the same message. Records are never padded (no
padding is needed: sets are not aligned).

Templates: one template set (the data templates) and one options template
set per options template go at the head of a message (before any data set) when templates are due: on
the first message, after `reset_templates()`, when `template_refresh_s` have
passed since they were last sent (by the caller's `now`; also when `now` went
backwards), and on every `template_refresh_messages`-th message. Sending all
templates together keeps a single refresh clock.

Sequence numbers. RFC 7011 3.1: "Incremental sequence counter modulo 2^32 of
all IPFIX Data Records sent in the current stream from the current
Observation Domain by the Exporting Process. [...] Template and Options
Template Records do not increase the Sequence Number." Its terminology
defines an Options Template Record as "a Template Record that defines the
structure and interpretation of fields in a Data Record, including defining
how to scope the applicability of the Data Record": options data records are
Data Records, and only template records are excluded. Section 10.3.2 says the
same for UDP ("the total number of IPFIX Data Records sent for the Transport
Session prior to the receipt of this IPFIX Message, modulo 2^32").
So in `sequence_mode="rfc"` (the default; ipfixcol2 and tshark count them too)
options records advance the counter; in `sequence_mode="nfdump"` only flow
records do, because nfcapd counts only those and reports "sequence failures"
otherwise.
`templates_message()` builds a message with templates only (for a new TCP
connection), which carries the current sequence number and does not advance it.

Zero records and no options give no messages and change no state: a message
without records is pointless over UDP, and a transport that needs templates
up front asks `templates_message()` for them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Literal, get_args, overload

import numpy as np
import numpy.typing as npt

from exporter.ipfix.options import ExporterState, Interface, OptionsEncoder, RecordGroup, fixed_group
from exporter.ipfix.templates import FLOW_V4, FLOW_V6, TUNNEL_TEMPLATES, Template, biflow_templates, template_sets
from exporter.records import BIFLOW_RECORD, EGRESS, FLOW_RECORD, INGRESS, Records
from exporter.tunnels import NO_TUNNELS, TUNNEL_RECORD

IPFIX_VERSION = 10
MESSAGE_HEADER = struct.Struct("!HHIII")
SET_HEADER = struct.Struct("!HH")
MAX_MTU = 65535          # the message header's length field
UDP_MAX_PAYLOAD = {4: 65507, 6: 65527}  # 65535 minus the IPv4 (20) or IPv6 (0: payload length) and UDP headers
SEQUENCE_MODULUS = 1 << 32
U64 = (1 << 64) - 1

SequenceMode = Literal["rfc", "nfdump"]
SEQUENCE_MODES: tuple[str, ...] = get_args(SequenceMode)

@dataclass(frozen=True)
class Source:
    """Where an information element's value comes from in a record: `field`, or the bytes `part`
    of it (an IPv4 address inside an IPv4-mapped one), or, with `when` = (flag field, value), the
    field where the flag has that value and 0 elsewhere. The numpy columns and the compiled
    core's field programs are both derived from these, so the two encoders read the same bytes."""

    field: str
    part: tuple[int, int] | None = None
    when: tuple[str, int] | None = None

    def column(self, recs: Records) -> npt.ArrayLike:
        col = recs[self.field]
        if self.part is not None:
            return col[:, self.part[0]:self.part[1]]
        if self.when is not None:
            flag, value = self.when
            return np.where(recs[flag] == value, col, col.dtype.type(0))
        return col

    def op(self, dtype: np.dtype[np.void], length: int) -> bytes:
        """The 8-byte field program step of exporter/_core.c (code, dst_len, src, cond, src_len, cond_value)."""
        sub, offset = dtype.fields[self.field][:2]  # type: ignore[index]
        if sub.subdtype is not None:  # bytes (an address)
            first = self.part[0] if self.part is not None else 0
            return struct.pack("<BBHHBB", 2, length, offset + first, 0, 0, 0)
        if self.when is None:
            return struct.pack("<BBHHBB", 1, length, offset, 0, sub.itemsize, 0)
        flag, value = self.when
        return struct.pack("<BBHHBB", 3, length, offset, dtype.fields[flag][1], sub.itemsize, value)  # type: ignore[index]


# Where each information element of the flow templates comes from in a FLOW_RECORD.
FLOW_SOURCES: dict[str, Source] = {
    # FLOW_RECORD stores IPv4 IPv4-mapped (::ffff:a.b.c.d); the address is the last 4 bytes.
    "sourceIPv4Address": Source("src_addr", part=(12, 16)),
    "destinationIPv4Address": Source("dst_addr", part=(12, 16)),
    "sourceIPv6Address": Source("src_addr"),
    "destinationIPv6Address": Source("dst_addr"),
    "sourceTransportPort": Source("src_port"),
    "destinationTransportPort": Source("dst_port"),
    "protocolIdentifier": Source("protocol"),
    # One interface field per hook: the one that metered the flow carries the ifindex, the other 0.
    "ingressInterface": Source("ifindex", when=("direction", INGRESS)),
    "egressInterface": Source("ifindex", when=("direction", EGRESS)),
    "flowDirection": Source("direction"),
    "vlanId": Source("vlan_id"),
    "ipClassOfService": Source("tos"),
    "tcpControlBits": Source("tcp_flags"),
    "icmpTypeCodeIPv4": Source("dst_port", when=("protocol", 1)),
    "icmpTypeCodeIPv6": Source("dst_port", when=("protocol", 58)),
    "minimumTTL": Source("min_ttl"),
    "maximumTTL": Source("max_ttl"),
    "packetDeltaCount": Source("packets"),
    "octetDeltaCount": Source("octets"),
    "flowStartMilliseconds": Source("first_ms"),
    "flowEndMilliseconds": Source("last_ms"),
    "flowEndReason": Source("end_reason"),
}


# A TUNNEL_RECORD (exporter/tunnels.py) is a FLOW_RECORD and the tunnel's export-ready columns.
TUNNEL_SOURCES: dict[str, Source] = {
    **FLOW_SOURCES,
    "tunnelTechnology": Source("technology"),
    "layer2SegmentId": Source("segment_id"),
    "greKey": Source("gre_key"),
    "UPSTREAM_TUNNEL_ID": Source("tunnel_id"),
    "UNTUNNELED_IPV4_SRC_ADDR": Source("outer_src", part=(12, 16)),
    "UNTUNNELED_IPV4_DST_ADDR": Source("outer_dst", part=(12, 16)),
    "UNTUNNELED_IPV6_SRC_ADDR": Source("outer_src"),
    "UNTUNNELED_IPV6_DST_ADDR": Source("outer_dst"),
}


def record_elements(rec: np.void) -> dict[str, int | str]:
    """One FLOW_RECORD as the information elements its data record carries, by IANA name (FLOW_V4 or
    FLOW_V6 read through FLOW_SOURCES, so JSON output and the wire cannot disagree): addresses as
    text; an element whose condition does not hold (the other hook's interface, the ICMP type of a
    flow that is not ICMP) and a zero flowEndReason (not ended) are left out."""
    v4 = int(rec["ip_version"]) == 4
    out: dict[str, int | str] = {}
    for f in (FLOW_V4 if v4 else FLOW_V6).fields:
        src = FLOW_SOURCES[f.name]
        if src.when is not None and int(rec[src.when[0]]) != src.when[1]:
            continue
        value = rec[src.field]
        if src.part is not None or value.shape:   # an address: IPv4-mapped or IPv6
            raw = bytes(value)
            out[f.name] = str(IPv4Address(raw[12:16])) if v4 else str(IPv6Address(raw))
        else:
            out[f.name] = int(value)
    if not out.get("flowEndReason"):
        out.pop("flowEndReason", None)
    return out


# A BIFLOW_RECORD names its forward half as FLOW_RECORD does; the reverse half has the RFC 5103 elements.
BIFLOW_SOURCES: dict[str, Source] = {
    **FLOW_SOURCES,
    "ingressInterface": Source("fwd_ifindex", when=("fwd_direction", INGRESS)),
    "egressInterface": Source("fwd_ifindex", when=("fwd_direction", EGRESS)),
    "flowDirection": Source("fwd_direction"),
    "reverseIngressInterface": Source("rev_ifindex", when=("rev_direction", INGRESS)),
    "reverseEgressInterface": Source("rev_ifindex", when=("rev_direction", EGRESS)),
    "reversePacketDeltaCount": Source("r_packets"),
    "reverseOctetDeltaCount": Source("r_octets"),
    "reverseFlowStartMilliseconds": Source("r_first_ms"),
    "reverseFlowEndMilliseconds": Source("r_last_ms"),
    "reverseTcpControlBits": Source("r_tcp_flags"),
    "reverseIpClassOfService": Source("r_tos"),
    "reverseMinimumTTL": Source("r_min_ttl"),
    "reverseMaximumTTL": Source("r_max_ttl"),
    "biflowDirection": Source("biflow_direction"),
}


def encode_records(template: Template, records: Records, sources: dict[str, Source] = FLOW_SOURCES) -> memoryview:
    """The data records of `records` under `template`, back to back, without a set header (numpy)."""
    out = np.empty(len(records), dtype=template.wire_dtype)
    for key, name in zip(template.keys, template.names, strict=True):
        out[key] = sources[name].column(records)
    # A flat byte view of the packed array: messages are joined from slices of it, with no copy of the whole.
    return out.view(np.uint8).data


def field_program(template: Template, dtype: np.dtype[np.void], sources: dict[str, Source]) -> bytes:
    """`template`'s data record as exporter/_core.c's field program over records of `dtype`."""
    lengths = [template.wire_dtype.fields[k][0].itemsize for k in template.keys]  # type: ignore[index]
    return b"".join(sources[name].op(dtype, n) for name, n in zip(template.names, lengths, strict=True))


def max_mtu(family: int | None) -> int:
    """The largest message one UDP datagram carries to a collector of IP `family` (None: a stream)."""
    return MAX_MTU if family is None else UDP_MAX_PAYLOAD[family]


@dataclass(frozen=True)
class FlowTotals:
    """Flow data records in a message and the sums of their packet and octet counters."""

    flows: int = 0
    packets: int = 0
    octets: int = 0

    def __add__(self, other: FlowTotals) -> FlowTotals:
        return FlowTotals(self.flows + other.flows, self.packets + other.packets, self.octets + other.octets)


@dataclass(frozen=True)
class EncodedTotals:
    """What an encoder has produced since it was made (templates-only messages included)."""

    messages: int = 0
    octets: int = 0
    flow_records: int = 0
    options_records: int = 0


def align_header(message: bytes, follower: bytes) -> bytes:
    """`message` with `follower`'s export time and sequence number, if both are IPFIX of one domain."""
    if len(message) < MESSAGE_HEADER.size or len(follower) < MESSAGE_HEADER.size:
        return message
    version, _, _, _, odid = MESSAGE_HEADER.unpack_from(message)
    f_version, _, _, _, f_odid = MESSAGE_HEADER.unpack_from(follower)
    if version != IPFIX_VERSION or f_version != IPFIX_VERSION or odid != f_odid:
        return message
    return message[:4] + follower[4:12] + message[12:]


class MessageTotals(Sequence[FlowTotals]):
    """The FlowTotals of each message of one encode() call, made only when asked for: encoding
    makes no object per message, and a sender asks only about the messages it did not deliver.
    `packets` and `octets` may be views of the compiled core's packed u64 sums."""

    __slots__ = ("flows", "octets", "packets")

    def __init__(self, flows: list[int], packets: Sequence[int], octets: Sequence[int]) -> None:
        if not len(flows) == len(packets) == len(octets):
            raise ValueError(f"{len(flows)} flow counts, {len(packets)} packet and {len(octets)} octet sums")
        self.flows = flows
        self.packets = packets
        self.octets = octets

    def __len__(self) -> int:
        return len(self.flows)

    @overload
    def __getitem__(self, index: int) -> FlowTotals: ...

    @overload
    def __getitem__(self, index: slice) -> MessageTotals: ...

    def __getitem__(self, index: int | slice) -> FlowTotals | MessageTotals:
        if isinstance(index, slice):
            return MessageTotals(self.flows[index], self.packets[index], self.octets[index])
        return FlowTotals(self.flows[index], self.packets[index], self.octets[index])


class Messages(list[bytes]):
    """What one encode() call produced: the IPFIX messages, in order, and for each what it carries
    (`totals[i]` for message i; options records not counted; `flows` the record counts alone)."""

    def __init__(self, messages: Iterable[bytes] = (), totals: MessageTotals | None = None) -> None:
        super().__init__(messages)
        self.totals = totals if totals is not None else MessageTotals([], [], [])
        if len(self.totals) != len(self):
            raise ValueError(f"{len(self)} messages but totals for {len(self.totals)}")

    @property
    def flows(self) -> list[int]:
        return self.totals.flows


# Running sums of packets and octets, from a row of zeros: records i..j-1 hold row j minus row i.
# uint64 like the compiled core's sums, so the two agree even where a sum would wrap.
CounterSums = npt.NDArray[np.uint64]


def counter_sums(records: Records) -> CounterSums:
    """(len + 1, 2) running sums of packets and octets; a biflow's reverse counters are added in."""
    sums = np.zeros((len(records) + 1, 2), dtype=np.uint64)
    names = records.dtype.names or ()
    for col, (forward, reverse) in enumerate((("packets", "r_packets"), ("octets", "r_octets"))):
        values = records[forward] + records[reverse] if reverse in names else records[forward]
        np.cumsum(values, out=sums[1:, col])
    return sums


def counter_offsets(dtype: np.dtype[np.void]) -> tuple[int, int, int, int]:
    """Where the compiled core finds packets, octets, reverse packets, reverse octets (-1: none)."""
    fields = dtype.fields
    if fields is None:
        raise TypeError("records must be a structured array")
    offsets = []
    for name in ("packets", "octets", "r_packets", "r_octets"):
        if name not in fields:
            offsets.append(-1)
            continue
        sub, at = fields[name][:2]
        if sub != np.dtype("<u8"):
            raise TypeError(f"{name} must be a little-endian uint64, not {sub}")
        offsets.append(at)
    return offsets[0], offsets[1], offsets[2], offsets[3]


class Encoder:
    """IPFIX message builder for one observation domain of one collector session.

    `exporting_process_id` and `exporter_address` go into the exporting-process
    reliability options record; `set_exporter_address()` follows the session's
    source address (a change of family re-sends the templates). `biflow`
    encodes BIFLOW_RECORDs; `per_interface` says the biflows pair per
    interface (egress metering), which makes the interfaces flow keys.
    """

    def __init__(
        self,
        odid: int = 0,
        mtu: int = 1400,
        template_refresh_s: float = 60.0,
        template_refresh_messages: int = 100,
        *,
        sequence: int = 0,
        sequence_mode: SequenceMode = "rfc",
        exporting_process_id: int = 0,
        exporter_address: str | IPv4Address | IPv6Address | None = None,
        biflow: bool = False,
        per_interface: bool = False,
        tunnels: bool = False,
        compiled: bool | None = None,
    ) -> None:
        if not 0 <= odid < SEQUENCE_MODULUS:
            raise ValueError(f"observation domain id {odid} is not an unsigned 32-bit value")
        if not 0 <= sequence < SEQUENCE_MODULUS:
            raise ValueError(f"sequence number {sequence} is not an unsigned 32-bit value")
        if template_refresh_s < 0:
            raise ValueError("template_refresh_s must be >= 0")
        if template_refresh_messages < 1:
            raise ValueError("template_refresh_messages must be >= 1")
        if sequence_mode not in SEQUENCE_MODES:
            raise ValueError(f"sequence_mode {sequence_mode!r} is not one of {', '.join(SEQUENCE_MODES)}")
        if tunnels and biflow:
            raise ValueError("tunnel records are uniflows: tunnels and biflow do not combine")
        self.odid = odid
        self.mtu = mtu
        self.template_refresh_s = float(template_refresh_s)
        self.template_refresh_messages = template_refresh_messages
        self.sequence_mode: SequenceMode = sequence_mode
        self.biflow = biflow
        self.record_dtype = BIFLOW_RECORD if biflow else FLOW_RECORD
        self._sources = BIFLOW_SOURCES if biflow else FLOW_SOURCES
        self._uniflow_templates: tuple[tuple[int, Template], ...] = ((4, FLOW_V4), (6, FLOW_V6))
        self._data_templates: tuple[tuple[int, Template], ...] = (
            tuple(zip((4, 6), biflow_templates(per_interface), strict=True)) if biflow else self._uniflow_templates)
        # Tunnel templates, chosen by TUNNEL_RECORD.family: inner ip_version << 4 | outer ip_version.
        self.tunnels = tunnels
        self._tunnel_templates: tuple[tuple[int, Template], ...] = tuple(
            ((inner << 4) | outer, t) for (inner, outer), t in TUNNEL_TEMPLATES.items()) if tunnels else ()
        # The compiled core (exporter/_core.c) encodes and frames when it is built; the numpy and
        # Python code below is the reference it is tested against (compiled=False forces it).
        from exporter import core

        if compiled and not core.available():
            core.module()  # raises, saying why
        self._core = core.module() if (compiled is None and core.available()) or compiled else None
        self._programs = {v: field_program(t, self.record_dtype, self._sources) for v, t in self._data_templates}
        self._uniflow_programs = {v: field_program(t, FLOW_RECORD, FLOW_SOURCES) for v, t in self._uniflow_templates}
        self._tunnel_programs = {v: field_program(t, TUNNEL_RECORD, TUNNEL_SOURCES) for v, t in self._tunnel_templates}
        self._options = OptionsEncoder(self.data_templates, odid, exporting_process_id, exporter_address)
        self._template_sets = b""
        self._by_id: dict[int, Template] = {}
        self._announce()
        least = minimum_mtu(self.templates)
        if not least <= mtu <= MAX_MTU:
            raise ValueError(f"mtu {mtu} outside {least}..{MAX_MTU}: the smallest holds the header, "
                             f"every template and one record")
        self._sequence = sequence
        self._templates_forced = True
        self._templates_sent_at = 0.0
        self._messages_since_templates = 0
        self._interfaces_sent: tuple[Interface, ...] | None = None
        self._totals = EncodedTotals()

    def _announce(self) -> None:
        self._template_sets = template_sets(self.templates)
        self._by_id = {t.template_id: t for t in self.templates}

    @property
    def sequence(self) -> int:
        """The sequence number the next message will carry: records counted so far, mod 2^32."""
        return self._sequence

    @property
    def templates(self) -> tuple[Template, ...]:
        """Data templates, then options templates, in the order they are announced."""
        return self.data_templates + self._options.templates

    @property
    def data_templates(self) -> tuple[Template, ...]:
        """The flow templates: a biflow encoder has the uniflow ones too, for one-sided biflows."""
        own = tuple(t for _, t in self._data_templates)
        if self.biflow:
            own += tuple(t for _, t in self._uniflow_templates)
        return own + tuple(t for _, t in self._tunnel_templates)

    @property
    def options_templates(self) -> tuple[Template, ...]:
        return self._options.templates

    @property
    def exporter_address(self) -> IPv4Address | IPv6Address | None:
        return self._options.exporter_address

    def set_exporter_address(self, address: str | IPv4Address | IPv6Address | None) -> None:
        """The session's source address for template 261; a new shape there is announced at once."""
        if self._options.set_exporter_address(address):
            self._announce()
            if MESSAGE_HEADER.size + len(self._template_sets) + SET_HEADER.size + self._largest_record() > self.mtu:
                raise ValueError(f"mtu {self.mtu} cannot hold the templates and one record")
            self._templates_forced = True

    @property
    def totals(self) -> EncodedTotals:
        return self._totals

    def reset_templates(self) -> None:
        """Put the templates in the next message (a new session must learn them again)."""
        self._templates_forced = True
        self._interfaces_sent = None

    def templates_message(self, now: float, follower: bytes | None = None) -> bytes:
        """A message holding only the (options) template sets; does not advance the sequence number.

        `follower`: a message of this encoder's that will be sent right after, encoded earlier (a
        stream's queue): the templates take its export time and sequence number, so the collector
        sees neither go backwards (ipfixcol2 ignores records older than their template)."""
        export_time = self._export_time(now)
        self._mark_templates_sent(now)
        self._messages_since_templates = 1
        self._interfaces_sent = None  # the next options run names the interfaces
        length = MESSAGE_HEADER.size + len(self._template_sets)
        self._count_output(1, length, 0, 0)
        header = MESSAGE_HEADER.pack(IPFIX_VERSION, length, export_time, self._sequence, self.odid)
        message = header + self._template_sets
        return message if follower is None else align_header(message, follower)

    def encode_options(self, state: ExporterState, now: float) -> Messages:
        """Messages holding only the options records for `state` (templates first when due)."""
        return self.encode(np.zeros(0, dtype=self.record_dtype), now, options=state)

    def encode(self, records: Records, now: float, options: ExporterState | None = None,
               tunnelled: Records = NO_TUNNELS) -> Messages:
        """Encode a FLOW_RECORD (BIFLOW_RECORD) array, after the options records for `options` if given,
        into messages <= mtu, with the flow records each message holds; `tunnelled` (TUNNEL_RECORDs,
        an encoder made with tunnels=True) follow the plain records."""
        export_time = self._export_time(now)
        if records.dtype != self.record_dtype:
            kind = "BIFLOW_RECORD" if self.biflow else "FLOW_RECORD"
            raise TypeError(f"expected a {kind} array, got dtype {records.dtype}")
        if len(tunnelled) and (tunnelled.dtype != TUNNEL_RECORD or not self.tunnels):
            raise TypeError("tunnelled records need TUNNEL_RECORDs and an encoder made with tunnels=True")
        groups: list[RecordGroup] = []
        if options is not None:
            names = options.interfaces != self._interfaces_sent or self._due_by_time(now)
            groups.extend(self._options.groups(options, interfaces=names))
            if names:
                self._interfaces_sent = options.interfaces
        uniflows = np.zeros(0, dtype=FLOW_RECORD)
        if self.biflow and len(records):
            from exporter.biflow import split_one_sided

            records, uniflows = split_one_sided(records)
        if self._core is not None:
            return self._encode_core(groups, records, uniflows, tunnelled, now, export_time)
        runs: list[tuple[RecordGroup, CounterSums | None]] = [(g, None) for g in groups]
        if len(records):
            runs.extend(self._encode_groups(records, self._data_templates, self._sources))
        if len(uniflows):
            runs.extend(self._encode_groups(uniflows, self._uniflow_templates, FLOW_SOURCES))
        if len(tunnelled):
            runs.extend(self._encode_groups(tunnelled, self._tunnel_templates, TUNNEL_SOURCES, "family"))
        if not runs:
            return Messages()
        return self._build_py([r for r in runs if r[0].records > 0], now, export_time)

    def _encode_core(self, groups: list[RecordGroup], records: Records, uniflows: Records, tunnelled: Records,
                     now: float, export_time: int) -> Messages:
        """encode() in the compiled core: data records encoded straight into the messages."""
        assert self._core is not None
        count_options = self.sequence_mode == "rfc"
        frames: list[tuple[Any, ...]] = [(g.template.template_id, g.record_length, g.payload, g.records, count_options,
                                          False) for g in groups if g.records > 0]
        options = len(frames)
        for recs, templates, programs, selector in (
                (records, self._data_templates, self._programs, "ip_version"),
                (uniflows, self._uniflow_templates, self._uniflow_programs, "ip_version"),
                (tunnelled, self._tunnel_templates, self._tunnel_programs, "family")):
            if len(recs):
                flat = np.ascontiguousarray(recs)
                version_at = recs.dtype.fields[selector][1]  # type: ignore[index]
                counters = counter_offsets(recs.dtype)
                frames += [(t.template_id, t.record_length, flat, programs[v], recs.dtype.itemsize,
                            version_at, v, True, True, *counters) for v, t in templates]
        if not frames:
            return Messages()
        due_by_time = self._due_by_time(now)
        messages, flows, sums, sequence, sent, since, counts = self._core.frame(
            frames, self._template_sets, self.mtu, self.odid, export_time, self._sequence, due_by_time,
            self._messages_since_templates, self.template_refresh_messages)
        if sum(counts[options:]) != len(records) + len(uniflows) + len(tunnelled):
            raise ValueError("records with an ip_version other than 4 or 6")
        if not messages:
            return Messages()
        if sent:
            self._templates_forced = False
            self._templates_sent_at = now
        self._messages_since_templates = since
        self._sequence = sequence
        self._count_output(len(messages), sum(len(m) for m in messages),
                           len(records) + len(uniflows) + len(tunnelled), sum(counts[:options]))
        packed = memoryview(sums).cast("Q")   # per message its packets, then its octets
        return Messages(messages, MessageTotals(flows, packed[0::2], packed[1::2]))

    def flow_totals(self, message: bytes | bytearray | memoryview) -> FlowTotals:
        """Flow records in one of this encoder's messages, with their packets and octets summed.

        Read from the bytes, so an independent check of `Messages.totals` (the export path uses
        those: a message that could not be sent loses exactly these).
        """
        raw = memoryview(message)
        if len(raw) < MESSAGE_HEADER.size:
            raise ValueError("shorter than an IPFIX message header")
        version, length, *_ = MESSAGE_HEADER.unpack_from(raw, 0)
        if version != IPFIX_VERSION or length != len(raw):
            raise ValueError("not a whole IPFIX message")
        total = FlowTotals()
        pos = MESSAGE_HEADER.size
        while pos < length:
            set_id, set_len = SET_HEADER.unpack_from(raw, pos)
            if set_len <= SET_HEADER.size or pos + set_len > length:
                raise ValueError(f"bad set length {set_len} at offset {pos}")
            template = self._by_id.get(set_id)
            if template is not None and template.scope_count == 0:
                recs = np.frombuffer(raw[pos + SET_HEADER.size:pos + set_len], dtype=template.wire_dtype)
                total += FlowTotals(len(recs), sum(recs["packetDeltaCount"].tolist()),
                                    sum(recs["octetDeltaCount"].tolist()))
                if "reversePacketDeltaCount" in template.keys:
                    total += FlowTotals(0, sum(recs["reversePacketDeltaCount"].tolist()),
                                        sum(recs["reverseOctetDeltaCount"].tolist()))
            pos += set_len
        return total

    def _build_py(self, runs: list[tuple[RecordGroup, CounterSums | None]], now: float,
                  export_time: int) -> Messages:
        """The reference framing (the compiled core's frame() does the same, byte for byte).

        `runs`: each group with the running sums of its flow records' counters (None: options)."""
        messages: list[bytes] = []
        parts: list[bytes | memoryview] = []
        pack_set = SET_HEADER.pack
        pack_header = MESSAGE_HEADER.pack
        count_options = self.sequence_mode == "rfc"
        sequence = self._sequence
        in_message = 0  # records in the open message that advance the sequence number
        room = 0  # bytes left in the open message
        is_open = False
        flow_records = options_records = 0
        flows_in_message = packets_in_message = octets_in_message = 0
        per_message: list[int] = []
        packets: list[int] = []
        octets: list[int] = []
        # Each set takes as many records as fit, so a group continues only in a new message.
        for (template, payload, count, reclen), sums in runs:
            tid = template.template_id
            counted = count_options or template.scope_count == 0
            if template.scope_count:
                options_records += count
            else:
                flow_records += count
            pos = 0
            while pos < count:
                if room < SET_HEADER.size + reclen:
                    if is_open:
                        messages.append(pack_header(IPFIX_VERSION, self.mtu - room, export_time, sequence, self.odid)
                                        + b"".join(parts))
                        sequence = (sequence + in_message) % SEQUENCE_MODULUS
                        per_message.append(flows_in_message)
                        packets.append(packets_in_message)
                        octets.append(octets_in_message)
                    parts = []
                    in_message = 0
                    flows_in_message = packets_in_message = octets_in_message = 0
                    is_open = True
                    room = self.mtu - MESSAGE_HEADER.size
                    if self._templates_due(now):
                        parts.append(self._template_sets)
                        room -= len(self._template_sets)
                        self._mark_templates_sent(now)
                    self._messages_since_templates += 1
                k = min(count - pos, (room - SET_HEADER.size) // reclen)
                parts.append(pack_set(tid, SET_HEADER.size + k * reclen))
                parts.append(payload[pos * reclen:(pos + k) * reclen])
                room -= SET_HEADER.size + k * reclen
                if sums is not None:
                    p, o = (sums[pos + k] - sums[pos]).tolist()
                    packets_in_message += p
                    octets_in_message += o
                pos += k
                if counted:
                    in_message += k
                if not template.scope_count:
                    flows_in_message += k
        per_message.append(flows_in_message)
        packets.append(packets_in_message & U64)   # a message's groups wrap as the core's one uint64 does
        octets.append(octets_in_message & U64)
        length = self.mtu - room
        messages.append(pack_header(IPFIX_VERSION, length, export_time, sequence, self.odid) + b"".join(parts))
        self._sequence = (sequence + in_message) % SEQUENCE_MODULUS
        self._count_output(len(messages), sum(len(m) for m in messages), flow_records, options_records)
        return Messages(messages, MessageTotals(per_message, packets, octets))

    def _count_output(self, messages: int, octets: int, flow_records: int, options_records: int) -> None:
        t = self._totals
        self._totals = EncodedTotals(t.messages + messages, t.octets + octets, t.flow_records + flow_records,
                                     t.options_records + options_records)

    def _largest_record(self) -> int:
        return max(t.record_length for t in self.templates if not t.variable)

    @staticmethod
    def _encode_groups(records: Records, templates: tuple[tuple[int, Template], ...],
                       sources: dict[str, Source],
                       selector: str = "ip_version") -> list[tuple[RecordGroup, CounterSums]]:
        versions = records[selector]
        groups: list[tuple[RecordGroup, CounterSums]] = []
        selected = 0
        for version, template in templates:
            mask = versions == version
            count = int(np.count_nonzero(mask))
            selected += count
            if count == 0:
                continue
            subset = records if count == len(records) else records[mask]
            groups.append((fixed_group(template, encode_records(template, subset, sources), count),
                           counter_sums(subset)))
        if selected != len(records):
            raise ValueError("records with an ip_version other than 4 or 6")
        return groups

    def _due_by_time(self, now: float) -> bool:
        elapsed = now - self._templates_sent_at
        # A clock stepped backwards would otherwise postpone the time-based refresh until it caught up.
        return self._templates_forced or elapsed >= self.template_refresh_s or elapsed < 0

    def _templates_due(self, now: float) -> bool:
        return self._due_by_time(now) or self._messages_since_templates >= self.template_refresh_messages

    def _mark_templates_sent(self, now: float) -> None:
        self._templates_forced = False
        self._templates_sent_at = now
        self._messages_since_templates = 0

    @staticmethod
    def _export_time(now: float) -> int:
        export_time = int(now)
        if not 0 <= export_time < SEQUENCE_MODULUS:
            raise ValueError(f"export time {now} does not fit the 32-bit header field")
        return export_time


def minimum_mtu(templates: tuple[Template, ...]) -> int:
    """The smallest MTU for `templates`: a message header, all their template sets and one record of any."""
    largest = max(t.record_length for t in templates if not t.variable)
    return MESSAGE_HEADER.size + len(template_sets(templates)) + SET_HEADER.size + largest


def encoder_minimum_mtu(biflow: bool = False, tunnels: bool = False) -> int:
    """minimum_mtu() of a session's encoder, once it knows its source address (template 261 names it)."""
    return minimum_mtu(Encoder(biflow=biflow, tunnels=tunnels, exporter_address="::1", mtu=MAX_MTU,
                               compiled=False).templates)
