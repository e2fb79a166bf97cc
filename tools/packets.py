"""Build well-formed Ethernet frames for traffic profiles, the demo and tests.

Each builder returns bytes; `Flow` describes one flow of a traffic mix and
knows the key and octets (IP total length) the XDP program will meter for it,
so tests can compare exported totals with what was sent.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

SRC_MAC = bytes.fromhex("020000000001")
# Not the observer's MAC: after XDP_PASS the observer's stack drops the frame
# as PACKET_OTHERHOST, so nothing is answered and no traffic leaves the test.
DST_MAC = bytes.fromhex("020000000002")

TCP, UDP, ICMP, ICMPV6, SCTP = 6, 17, 1, 58, 132


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ethernet(ethertype: int, payload: bytes, vlan: int | None = None, src: bytes = SRC_MAC,
             dst: bytes = DST_MAC) -> bytes:
    tag = struct.pack("!HH", 0x8100, vlan & 0x0FFF) if vlan is not None else b""
    return dst + src + tag + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, tos: int = 0, ttl: int = 64, ident: int = 0,
         frag: int = 0) -> bytes:
    total = 20 + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, tos, total, ident, frag, ttl, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + payload


def ipv6(src: str, dst: str, nexthdr: int, payload: bytes, tclass: int = 0, hlim: int = 64) -> bytes:
    first = (6 << 28) | (tclass << 20)
    return struct.pack("!IHBB16s16s", first, len(payload), nexthdr, hlim,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + payload


def tcp(sport: int, dport: int, flags: int, payload: bytes = b"", seq: int = 1) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags & 0xFF, 65535, 0, 0) + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp(type_: int, code: int, payload: bytes = b"") -> bytes:
    body = struct.pack("!BBHHH", type_, code, 0, 1, 1) + payload
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


@dataclass(frozen=True)
class Flow:
    """One flow of a traffic mix: a frame repeated `count` times."""

    name: str
    src: str
    dst: str
    proto: int
    sport: int = 0
    dport: int = 0
    tcp_flags: int = 0
    vlan: int | None = None
    payload_len: int = 32
    count: int = 1
    tos: int = 0

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.src).version

    def l4(self) -> bytes:
        pad = bytes(self.payload_len)
        if self.proto == TCP:
            return tcp(self.sport, self.dport, self.tcp_flags, pad)
        if self.proto == UDP:
            return udp(self.sport, self.dport, pad)
        if self.proto in (ICMP, ICMPV6):
            return icmp(self.dport >> 8, self.dport & 0xFF, pad)
        return pad

    def frame(self) -> bytes:
        if self.version == 4:
            return ethernet(0x0800, ipv4(self.src, self.dst, self.proto, self.l4(), tos=self.tos), self.vlan)
        return ethernet(0x86DD, ipv6(self.src, self.dst, self.proto, self.l4(), tclass=self.tos), self.vlan)

    @property
    def octets_per_packet(self) -> int:
        """IP total length: what octetDeltaCount counts."""
        return len(self.frame()) - 14 - (4 if self.vlan is not None else 0)

    @property
    def key(self) -> tuple[str, str, int, int, int, int]:
        """(src, dst, proto, sport, dport, vlan) as exported: ICMP has sport 0."""
        return (self.src, self.dst, self.proto, self.sport if self.proto not in (ICMP, ICMPV6) else 0,
                self.dport, self.vlan or 0)


def standard_mix(scale: int = 1) -> list[Flow]:
    """IPv4 and IPv6, TCP with flags, UDP, ICMP, ICMPv6 and a VLAN: the mix tests and the demo send."""
    return [
        Flow("tcp4-syn", "198.18.0.1", "198.19.0.1", TCP, 40001, 443, tcp_flags=0x02, count=10 * scale),
        Flow("tcp4-data", "198.18.0.1", "198.19.0.2", TCP, 40002, 80, tcp_flags=0x18, payload_len=400,
             count=200 * scale),
        Flow("udp4", "198.18.0.2", "198.19.0.3", UDP, 5353, 53, payload_len=60, count=120 * scale, tos=0x28),
        Flow("icmp4", "198.18.0.3", "198.19.0.4", ICMP, 0, (8 << 8) | 0, payload_len=56, count=30 * scale),
        Flow("udp4-vlan", "198.18.1.1", "198.19.1.1", UDP, 1000, 2000, vlan=42, payload_len=100,
             count=50 * scale),
        Flow("tcp6", "fd00::1", "fd00::2", TCP, 50000, 22, tcp_flags=0x10, payload_len=200, count=80 * scale),
        Flow("udp6", "fd00::3", "fd00::4", UDP, 6000, 7000, payload_len=900, count=40 * scale),
        Flow("icmp6", "fd00::5", "fd00::6", ICMPV6, 0, (128 << 8) | 0, payload_len=16, count=20 * scale),
    ]
