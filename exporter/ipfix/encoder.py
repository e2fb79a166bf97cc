"""Sans-IO IPFIX (RFC 7011) encoder: FLOW_RECORD arrays in, messages out.

Theory of operation. `encode(records, now)` splits the batch by ip_version
into the IPv4 (256) and IPv6 (257) data templates, then builds each family's
data records in one go: an array of the template's packed big-endian wire
dtype, filled column by column with whole-array assignments and viewed as
one flat byte buffer. The records of a family are then contiguous slices
of that buffer, so cutting messages is only slicing and joining.

Messages are filled greedily up to the MTU: IPv4 records first, then IPv6,
each in input order; when one family runs out mid-message the other starts a
new set in the same message. Records are never padded (no padding is
needed: sets are not aligned).

Templates: one template set listing every template goes at the head of a
message (before any data set) when templates are due: on the first message,
after `reset_templates()`, when `template_refresh_s` have passed since they
were last sent (by the caller's `now`; also when `now` went backwards), and
on every `template_refresh_messages`-th message. Always sending both data
templates keeps a single refresh clock and costs 148 bytes per refresh.

Sequence numbers (RFC 7011 3.1): the header carries the number of data
records sent in this observation domain before the message, mod 2^32.
Template records do not count. `templates_message()` builds a message with
templates only (for a new TCP connection), which carries the current
sequence number and does not advance it.

Zero records give no messages and change no state: a message without data
is pointless over UDP, and a transport that needs templates up front asks
`templates_message()` for them.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from exporter.ipfix.templates import FLOW_V4, FLOW_V6, Template, template_sets
from exporter.records import FLOW_RECORD, Records

IPFIX_VERSION = 10
MESSAGE_HEADER = struct.Struct("!HHIII")
SET_HEADER = struct.Struct("!HH")
MIN_MTU = 512
MAX_MTU = 65535
SEQUENCE_MODULUS = 1 << 32

Column = Callable[[Records], npt.ArrayLike]


def _icmp_type_code(icmp_protocol: int) -> Column:
    def column(recs: Records) -> npt.ArrayLike:
        return np.where(recs["protocol"] == icmp_protocol, recs["dst_port"], np.uint16(0))
    return column


def _field(name: str) -> Column:
    return lambda recs: recs[name]


def _ipv4(name: str) -> Column:
    # FLOW_RECORD stores IPv4 IPv4-mapped (::ffff:a.b.c.d); the address is the last 4 bytes.
    return lambda recs: recs[name][:, 12:16]


# Where each information element of the flow templates comes from in a FLOW_RECORD.
FLOW_COLUMNS: dict[str, Column] = {
    "sourceIPv4Address": _ipv4("src_addr"),
    "destinationIPv4Address": _ipv4("dst_addr"),
    "sourceIPv6Address": _field("src_addr"),
    "destinationIPv6Address": _field("dst_addr"),
    "sourceTransportPort": _field("src_port"),
    "destinationTransportPort": _field("dst_port"),
    "protocolIdentifier": _field("protocol"),
    "ingressInterface": _field("ifindex"),
    "vlanId": _field("vlan_id"),
    "ipClassOfService": _field("tos"),
    "tcpControlBits": _field("tcp_flags"),
    "icmpTypeCodeIPv4": _icmp_type_code(1),
    "icmpTypeCodeIPv6": _icmp_type_code(58),
    "minimumTTL": _field("min_ttl"),
    "maximumTTL": _field("max_ttl"),
    "packetDeltaCount": _field("packets"),
    "octetDeltaCount": _field("octets"),
    "flowStartMilliseconds": _field("first_ms"),
    "flowEndMilliseconds": _field("last_ms"),
    "flowEndReason": _field("end_reason"),
}


def encode_records(template: Template, records: Records, columns: dict[str, Column] = FLOW_COLUMNS) -> memoryview:
    """The data records of `records` under `template`, back to back, without a set header."""
    out = np.empty(len(records), dtype=template.wire_dtype)
    for name in template.names:
        out[name] = columns[name](records)
    # A flat byte view of the packed array: messages are joined from slices of it, with no copy of the whole.
    return out.view(np.uint8).data


class Encoder:
    """IPFIX message builder for one observation domain of one collector session."""

    def __init__(
        self,
        odid: int = 0,
        mtu: int = 1400,
        template_refresh_s: float = 60.0,
        template_refresh_messages: int = 100,
        *,
        sequence: int = 0,
    ) -> None:
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"mtu {mtu} outside {MIN_MTU}..{MAX_MTU}")
        if not 0 <= odid < SEQUENCE_MODULUS:
            raise ValueError(f"observation domain id {odid} is not an unsigned 32-bit value")
        if not 0 <= sequence < SEQUENCE_MODULUS:
            raise ValueError(f"sequence number {sequence} is not an unsigned 32-bit value")
        if template_refresh_s < 0:
            raise ValueError("template_refresh_s must be >= 0")
        if template_refresh_messages < 1:
            raise ValueError("template_refresh_messages must be >= 1")
        self.odid = odid
        self.mtu = mtu
        self.template_refresh_s = float(template_refresh_s)
        self.template_refresh_messages = template_refresh_messages
        self._data_templates: tuple[tuple[int, Template], ...] = ((4, FLOW_V4), (6, FLOW_V6))
        self._template_sets = template_sets([t for _, t in self._data_templates])
        largest = max(t.record_length for _, t in self._data_templates)
        if MESSAGE_HEADER.size + len(self._template_sets) + SET_HEADER.size + largest > mtu:
            raise ValueError(f"mtu {mtu} cannot hold the templates and one record")
        self._sequence = sequence
        self._templates_forced = True
        self._templates_sent_at = 0.0
        self._messages_since_templates = 0

    @property
    def sequence(self) -> int:
        """The sequence number the next message will carry: data records sent so far, mod 2^32."""
        return self._sequence

    @property
    def templates(self) -> tuple[Template, ...]:
        return tuple(t for _, t in self._data_templates)

    def reset_templates(self) -> None:
        """Put the templates in the next message (a new session must learn them again)."""
        self._templates_forced = True

    def templates_message(self, now: float) -> bytes:
        """A message holding only the template set(s); does not advance the sequence number."""
        export_time = self._export_time(now)
        self._mark_templates_sent(now)
        self._messages_since_templates = 1
        length = MESSAGE_HEADER.size + len(self._template_sets)
        return MESSAGE_HEADER.pack(IPFIX_VERSION, length, export_time, self._sequence, self.odid) + self._template_sets

    def encode(self, records: Records, now: float) -> list[bytes]:
        """Encode a FLOW_RECORD array into messages of at most `mtu` bytes."""
        export_time = self._export_time(now)
        if records.dtype != FLOW_RECORD:
            raise TypeError(f"expected a FLOW_RECORD array, got dtype {records.dtype}")
        if len(records) == 0:
            return []
        groups = self._encode_groups(records)

        messages: list[bytes] = []
        parts: list[bytes | memoryview] = []
        pack_set = SET_HEADER.pack
        pack_header = MESSAGE_HEADER.pack
        sequence = self._sequence
        in_message = 0  # data records in the open message
        room = 0  # bytes left in the open message
        is_open = False
        # Each set takes as many records as fit, so a group continues only in a new message.
        for template, payload, count in groups:
            tid = template.template_id
            reclen = template.record_length
            pos = 0
            while pos < count:
                if room < SET_HEADER.size + reclen:
                    if is_open:
                        messages.append(pack_header(IPFIX_VERSION, self.mtu - room, export_time, sequence, self.odid)
                                        + b"".join(parts))
                        sequence = (sequence + in_message) % SEQUENCE_MODULUS
                    parts = []
                    in_message = 0
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
                pos += k
                in_message += k
        length = self.mtu - room
        messages.append(pack_header(IPFIX_VERSION, length, export_time, sequence, self.odid) + b"".join(parts))
        self._sequence = (sequence + in_message) % SEQUENCE_MODULUS
        return messages

    def _encode_groups(self, records: Records) -> list[tuple[Template, memoryview, int]]:
        versions = records["ip_version"]
        groups = []
        selected = 0
        for version, template in self._data_templates:
            mask = versions == version
            count = int(np.count_nonzero(mask))
            selected += count
            if count == 0:
                continue
            subset = records if count == len(records) else records[mask]
            groups.append((template, encode_records(template, subset), count))
        if selected != len(records):
            raise ValueError("records with an ip_version other than 4 or 6")
        return groups

    def _templates_due(self, now: float) -> bool:
        elapsed = now - self._templates_sent_at
        # A clock stepped backwards would otherwise postpone the time-based refresh until it caught up.
        return (self._templates_forced
                or self._messages_since_templates >= self.template_refresh_messages
                or elapsed >= self.template_refresh_s
                or elapsed < 0)

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


def random_records(n: int, seed: int = 0, ipv6_share: float = 0.2) -> Records:
    """n plausible random flow records (for benchmarks and tests)."""
    rng = np.random.default_rng(seed)
    recs = np.zeros(n, dtype=FLOW_RECORD)
    v6 = rng.random(n) < ipv6_share
    recs["ip_version"] = np.where(v6, 6, 4)
    for name in ("src_addr", "dst_addr"):
        addr = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
        addr[~v6, :10] = 0
        addr[~v6, 10:12] = 0xFF
        recs[name] = addr
    recs["protocol"] = rng.choice(np.array([6, 17, 1, 58], dtype=np.uint8), size=n, p=[0.6, 0.3, 0.05, 0.05])
    recs["src_port"] = rng.integers(0, 65536, n)
    recs["dst_port"] = rng.integers(0, 65536, n)
    recs["ifindex"] = rng.integers(1, 64, n)
    recs["vlan_id"] = rng.integers(0, 4096, n)
    recs["packets"] = rng.integers(1, 1 << 20, n)
    recs["octets"] = recs["packets"] * rng.integers(40, 1500, n).astype(np.uint64)
    recs["first_ms"] = 1_700_000_000_000 + rng.integers(0, 60_000, n)
    recs["last_ms"] = recs["first_ms"] + rng.integers(0, 60_000, n).astype(np.uint64)
    recs["tcp_flags"] = rng.integers(0, 512, n)
    recs["tos"] = rng.integers(0, 256, n)
    recs["min_ttl"] = rng.integers(1, 128, n)
    recs["max_ttl"] = recs["min_ttl"] + rng.integers(0, 128, n).astype(np.uint8)
    recs["end_reason"] = rng.integers(1, 6, n)
    return recs


def benchmark_encode(n: int = 500_000, mtu: int = 1400, repeat: int = 5) -> float:
    """Records per second for encode() of n random records (best of `repeat` runs)."""
    records = random_records(n)
    best = float("inf")
    for _ in range(repeat):
        encoder = Encoder(mtu=mtu)
        start = time.perf_counter()
        encoder.encode(records, 1_700_000_000.0)
        best = min(best, time.perf_counter() - start)
    return n / best
