"""Pure-Python reference of the parsing rules in xdp/flow.c's header comment.

Written from the rules, not from the C: the differential fuzz test
(tests/kernel/test_parser.py) runs both on the same frames and holds them
equal. The input is the bytes the program can read (data .. data_end), the
interface's ifindex and the direction (0: the XDP ingress program, 1: the TC
egress program; both parse alike); the output is a Verdict (parse failure, not
IP) or a Metered packet: the flow key plus what the packet adds to the flow
value. (At egress a GSO skb stands for several packets and a VLAN tag may sit
in the skb's metadata: flow.c's header comment; neither is modelled here.)

The rules, restated:
- Ethernet needs 14 bytes. Up to VLAN_MAX_DEPTH tags of 0x8100 or 0x88a8, 4
  bytes each; the outer tag's VID is the key's vlan_id. A deeper stack is a
  parse failure. Any ethertype other than IPv4/IPv6 after the tags is not IP.
- IPv4: 20 bytes, version 4, IHL >= 5, the header within the frame, total
  length >= header and within the frame. Octets = total length. A non-first
  fragment (offset != 0) is metered with ports 0.
- IPv6: 40 bytes, version 6, 40 + payload length within the frame; octets =
  40 + payload length. Hop-by-hop (0), routing (43), destination options (60)
  and fragment (44) headers are skipped, at most IPV6_MAX_EXT of them, each
  within the packet; a longer chain is a parse failure. A non-first fragment
  stops the walk and is metered with ports 0.
- Transport headers must lie within the IP packet: TCP 20 bytes (ports,
  flags), UDP 8, SCTP 12 (ports), ICMP over IPv4 / ICMPv6 over IPv6 4 (type,
  code -> destination port type << 8 | code). Any other protocol is metered
  with ports 0.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass
from typing import Any

VLAN_MAX_DEPTH = 2      # XDPFLOW_VLAN_MAX_DEPTH in xdp/flow.h
IPV6_MAX_EXT = 6        # XDPFLOW_IPV6_MAX_EXT in xdp/flow.h

ETH_HLEN = 14
VLAN_TPIDS = (0x8100, 0x88A8)
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD

IPV6_SKIPPED = (0, 43, 60)   # hop-by-hop, routing, destination options: (len + 1) * 8 bytes
IPV6_FRAGMENT = 44           # fixed 8 bytes
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132

IPV4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"

_KEY_STRUCT = struct.Struct("<16s16sHHIHBBB3s")  # struct flow_key, host (little-endian) order
INGRESS = 0   # flow_key.direction: XDPFLOW_INGRESS / XDPFLOW_EGRESS in xdp/flow.h
EGRESS = 1
KEY_SIZE = _KEY_STRUCT.size


class Verdict(enum.Enum):
    PARSE_FAILURE = "parse_failure"
    NON_IP = "non_ip"


@dataclass(frozen=True)
class FlowKey:
    src_addr: bytes     # 16 bytes, IPv4-mapped for IPv4
    dst_addr: bytes
    src_port: int
    dst_port: int
    ifindex: int
    vlan_id: int
    protocol: int
    ip_version: int
    direction: int = INGRESS
    segment: bytes = bytes(3)   # tunnels: the VNI / GRE key's low 24 bits, little-endian (ref_tunnel.py)

    def pack(self) -> bytes:
        """The 48 bytes of struct flow_key as the kernel stores it (little-endian host, pad zero)."""
        return _KEY_STRUCT.pack(self.src_addr, self.dst_addr, self.src_port, self.dst_port, self.ifindex,
                                self.vlan_id, self.protocol, self.ip_version, self.direction, self.segment)

    @classmethod
    def unpack(cls, raw: bytes) -> FlowKey:
        return cls(*_KEY_STRUCT.unpack(raw))

    @classmethod
    def from_record(cls, rec: Any) -> FlowKey:
        """From a numpy record with FLOW_KEY's field names (a FLOW_KEY or FLOW_RECORD row)."""
        return cls(bytes(rec["src_addr"]), bytes(rec["dst_addr"]), int(rec["src_port"]), int(rec["dst_port"]),
                   int(rec["ifindex"]), int(rec["vlan_id"]), int(rec["protocol"]), int(rec["ip_version"]),
                   int(rec["direction"]), bytes(rec["segment"]))

    def __str__(self) -> str:
        def addr(a: bytes) -> str:
            if self.ip_version == 4 and a[:12] == IPV4_MAPPED_PREFIX:
                return ".".join(str(b) for b in a[12:])
            return a.hex()
        way = "in" if self.direction == INGRESS else "out" if self.direction == EGRESS else f"dir {self.direction}"
        seg = f" segment {int.from_bytes(self.segment, 'little')}" if any(self.segment) else ""
        return (f"v{self.ip_version} proto {self.protocol} {addr(self.src_addr)}:{self.src_port} -> "
                f"{addr(self.dst_addr)}:{self.dst_port} {way} if {self.ifindex} vlan {self.vlan_id}{seg}")


@dataclass(frozen=True)
class Metered:
    """A parsed packet: its key and what it adds to the flow value."""

    key: FlowKey
    octets: int
    tcp_flags: int
    tos: int
    ttl: int
    # Where the transport header lies in the frame (-1: none read, a non-first fragment) and where the
    # IP packet ends: what the extensions (tunnels, DNS, TCP) read from. Not part of what is metered.
    l4: int = dataclasses.field(default=-1, compare=False)
    end: int = dataclasses.field(default=0, compare=False)


Result = Metered | Verdict


def _u16(b: bytes, off: int) -> int:
    return (b[off] << 8) | b[off + 1]


def parse(frame: bytes, ifindex: int = 1, direction: int = INGRESS) -> Result:
    """Apply the rules to the bytes the program sees; `ifindex`: the interface it ran on
    (XDP: ingress_ifindex; TC egress: the skb's device), `direction`: which program."""
    result = _parse(frame, ifindex)
    if direction != INGRESS and isinstance(result, Metered):
        return dataclasses.replace(result, key=dataclasses.replace(result.key, direction=direction))
    return result


def _parse(frame: bytes, ifindex: int) -> Result:
    if len(frame) < ETH_HLEN:
        return Verdict.PARSE_FAILURE
    ethertype = _u16(frame, 12)
    off = ETH_HLEN
    vlan_id = 0
    depth = 0
    while ethertype in VLAN_TPIDS:
        if depth == VLAN_MAX_DEPTH:
            return Verdict.PARSE_FAILURE
        if off + 4 > len(frame):
            return Verdict.PARSE_FAILURE
        if depth == 0:
            vlan_id = _u16(frame, off) & 0x0FFF
        ethertype = _u16(frame, off + 2)
        off += 4
        depth += 1
    if ethertype == ETH_P_IP:
        return _at(_ipv4(frame[off:], ifindex, vlan_id), off)
    if ethertype == ETH_P_IPV6:
        return _at(_ipv6(frame[off:], ifindex, vlan_id), off)
    return Verdict.NON_IP


def _at(result: Result, off: int) -> Result:
    """A result parsed from the IP header at `off` of the frame, its offsets made the frame's."""
    if isinstance(result, Metered):
        return dataclasses.replace(result, l4=result.l4 + off if result.l4 >= 0 else -1, end=result.end + off)
    return result


def parse_ip(ip: bytes, ifindex: int, vlan_id: int, version: int) -> Result:
    """The IP packet at the start of `ip` (IPv4 or IPv6 by `version`), offsets relative to `ip`."""
    return _ipv4(ip, ifindex, vlan_id) if version == 4 else _ipv6(ip, ifindex, vlan_id)


def _ipv4(ip: bytes, ifindex: int, vlan_id: int) -> Result:
    if len(ip) < 20 or ip[0] >> 4 != 4:
        return Verdict.PARSE_FAILURE
    ihl = (ip[0] & 0x0F) * 4
    if ihl < 20 or ihl > len(ip):
        return Verdict.PARSE_FAILURE
    total = _u16(ip, 2)
    if total < ihl or total > len(ip):
        return Verdict.PARSE_FAILURE
    packet = ip[:total]
    protocol = packet[9]
    sport = dport = flags = 0
    l4_at = -1
    if _u16(packet, 6) & 0x1FFF == 0:  # first (or only) fragment: the transport header is here
        l4 = _transport(protocol, packet[ihl:], IPPROTO_ICMP)
        if l4 is None:
            return Verdict.PARSE_FAILURE
        sport, dport, flags = l4
        l4_at = ihl
    key = FlowKey(IPV4_MAPPED_PREFIX + packet[12:16], IPV4_MAPPED_PREFIX + packet[16:20], sport, dport, ifindex,
                  vlan_id, protocol, 4)
    return Metered(key, total, flags, packet[1], packet[8], l4_at, total)


def _ipv6(ip: bytes, ifindex: int, vlan_id: int) -> Result:
    if len(ip) < 40 or ip[0] >> 4 != 6:
        return Verdict.PARSE_FAILURE
    total = 40 + _u16(ip, 4)
    if total > len(ip):
        return Verdict.PARSE_FAILURE
    packet = ip[:total]
    tos = ((packet[0] & 0x0F) << 4) | (packet[1] >> 4)
    ttl = packet[7]

    def metered(protocol: int, sport: int, dport: int, flags: int, l4_at: int = -1) -> Metered:
        key = FlowKey(packet[8:24], packet[24:40], sport, dport, ifindex, vlan_id, protocol, 6)
        return Metered(key, total, flags, tos, ttl, l4_at, total)

    nh = packet[6]
    pos = 40
    skipped = 0
    while nh in IPV6_SKIPPED or nh == IPV6_FRAGMENT:
        if skipped == IPV6_MAX_EXT:
            return Verdict.PARSE_FAILURE
        skipped += 1
        if nh == IPV6_FRAGMENT:
            if pos + 8 > total:
                return Verdict.PARSE_FAILURE
            nh = packet[pos]
            offset = _u16(packet, pos + 2) >> 3
            pos += 8
            if offset != 0:
                return metered(nh, 0, 0, 0)
        else:
            if pos + 2 > total:
                return Verdict.PARSE_FAILURE
            length = (packet[pos + 1] + 1) * 8
            if pos + length > total:
                return Verdict.PARSE_FAILURE
            nh = packet[pos]
            pos += length
    l4 = _transport(nh, packet[pos:], IPPROTO_ICMPV6)
    if l4 is None:
        return Verdict.PARSE_FAILURE
    return metered(nh, *l4, pos)


def _transport(protocol: int, l4: bytes, icmp_protocol: int) -> tuple[int, int, int] | None:
    """(src port, dst port, tcp flags), or None when the header runs past the IP packet."""
    if protocol == IPPROTO_TCP:
        if len(l4) < 20:
            return None
        return _u16(l4, 0), _u16(l4, 2), _u16(l4, 12) & 0x01FF
    if protocol in (IPPROTO_UDP, IPPROTO_SCTP):
        if len(l4) < (8 if protocol == IPPROTO_UDP else 12):
            return None
        return _u16(l4, 0), _u16(l4, 2), 0
    if protocol == icmp_protocol:
        if len(l4) < 4:
            return None
        return 0, _u16(l4, 0), 0
    return 0, 0, 0
