"""Frame builders for parser tests: Ethernet, VLAN tags, IPv4, IPv6 + extension headers, transports.

Every builder returns bytes and takes explicit overrides for the fields a test
may want to get wrong on purpose (IHL, total length, payload length, version,
data offset...). Nothing here validates: a builder writes what it is told.
Layering is by concatenation, innermost first:

    ethernet(ETH_P_IP, ipv4(PROTO_TCP, tcp(1234, 80, flags=SYN)), vlans=[vlan(100)])

Checksums: the IPv4 header checksum is filled in (cheap, and keeps frames
realistic for captures); transport checksums are left 0 (the parser never
reads them).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ETH_P_IPV6 = 0x86DD
ETH_P_LLDP = 0x88CC
ETH_P_MPLS = 0x8847

PROTO_HOPOPTS = 0
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ROUTING = 43
PROTO_FRAGMENT = 44
PROTO_GRE = 47
PROTO_ESP = 50
PROTO_ICMPV6 = 58
PROTO_NONE = 59
PROTO_DSTOPTS = 60
PROTO_SCTP = 132

IPV6_EXT_PROTOS = (PROTO_HOPOPTS, PROTO_ROUTING, PROTO_DSTOPTS, PROTO_FRAGMENT)

TCP_FIN = 0x001
TCP_SYN = 0x002
TCP_RST = 0x004
TCP_PSH = 0x008
TCP_ACK = 0x010
TCP_URG = 0x020
TCP_ECE = 0x040
TCP_CWR = 0x080
TCP_NS = 0x100

IPV4_DF = 0x2
IPV4_MF = 0x1

DST_MAC = bytes.fromhex("020000000002")
SRC_MAC = bytes.fromhex("020000000001")
SRC4 = bytes([198, 18, 0, 1])
DST4 = bytes([198, 18, 0, 2])
SRC6 = bytes.fromhex("20010db8000000000000000000000001")
DST6 = bytes.fromhex("20010db8000000000000000000000002")

ETH_MIN_FRAME = 60  # without FCS: shorter frames are padded on the wire


# -- link layer --------------------------------------------------------------

def vlan(vid: int, tpid: int = ETH_P_8021Q, pcp: int = 0, dei: int = 0) -> tuple[int, int]:
    """One VLAN tag as (TPID, TCI), for ethernet(vlans=...). Outermost tag first in that list."""
    return tpid, ((pcp & 0x7) << 13) | ((dei & 0x1) << 12) | (vid & 0x0FFF)


def ethernet(ethertype: int, payload: bytes = b"", *, vlans: Sequence[tuple[int, int]] = (),
             dst: bytes = DST_MAC, src: bytes = SRC_MAC, pad_to: int = 0) -> bytes:
    """An Ethernet II frame (no FCS) with optional stacked tags; zero-padded to `pad_to` bytes."""
    out = bytearray(dst + src)
    for tpid, tci in vlans:
        out += struct.pack("!HH", tpid, tci)
    out += struct.pack("!H", ethertype)
    out += payload
    if len(out) < pad_to:
        out += bytes(pad_to - len(out))
    return bytes(out)


def arp_request(sender_ip: bytes = SRC4, target_ip: bytes = DST4, sender_mac: bytes = SRC_MAC) -> bytes:
    """ARP payload (who-has), to wrap in ethernet(ETH_P_ARP, ...)."""
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 1, sender_mac, sender_ip, bytes(6), target_ip)


# -- IPv4 ---------------------------------------------------------------------

def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(protocol: int, payload: bytes = b"", *, src: bytes = SRC4, dst: bytes = DST4, tos: int = 0,
         ttl: int = 64, ident: int = 0, flags: int = 0, frag_offset: int = 0, options: bytes = b"",
         ihl: int | None = None, total_length: int | None = None, version: int = 4) -> bytes:
    """An IPv4 packet. `options` is zero-padded to a multiple of 4 bytes.

    `frag_offset` is in 8-byte units (the header field). `ihl` and
    `total_length` default to the true values; override them to build
    malformed headers (the bytes written stay the same, only the fields lie).
    """
    if len(options) % 4:
        options += bytes(4 - len(options) % 4)
    true_ihl = 5 + len(options) // 4
    hdr_ihl = true_ihl if ihl is None else ihl
    tot = 4 * true_ihl + len(payload) if total_length is None else total_length
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", ((version & 0xF) << 4) | (hdr_ihl & 0xF), tos, tot & 0xFFFF,
                                ident, ((flags & 0x7) << 13) | (frag_offset & 0x1FFF), ttl, protocol, 0,
                                src, dst))
    hdr += options
    struct.pack_into("!H", hdr, 10, inet_checksum(bytes(hdr)))
    return bytes(hdr) + payload


# -- IPv6 ---------------------------------------------------------------------

def ipv6(next_header: int, payload: bytes = b"", *, src: bytes = SRC6, dst: bytes = DST6, traffic_class: int = 0,
         flow_label: int = 0, hop_limit: int = 64, payload_length: int | None = None, version: int = 6) -> bytes:
    """An IPv6 packet; `payload` includes any extension headers (see ext_chain)."""
    plen = len(payload) if payload_length is None else payload_length
    first = ((version & 0xF) << 28) | ((traffic_class & 0xFF) << 20) | (flow_label & 0xFFFFF)
    return struct.pack("!IHBB16s16s", first, plen & 0xFFFF, next_header, hop_limit, src, dst) + payload


@dataclass(frozen=True)
class Ext:
    """One IPv6 extension header.

    kind: PROTO_HOPOPTS, PROTO_ROUTING, PROTO_DSTOPTS or PROTO_FRAGMENT (or any
    number, written in the generic 8-byte-unit format). `units`: the Hdr Ext Len
    field (header is (units + 1) * 8 bytes), ignored for fragments (always 8).
    `frag_offset` (8-byte units) and `more` for fragment headers.
    """

    kind: int
    units: int = 0
    frag_offset: int = 0
    more: bool = False
    ident: int = 0x12345678


def ext_header(ext: Ext, next_header: int) -> bytes:
    if ext.kind == PROTO_FRAGMENT:
        field = ((ext.frag_offset & 0x1FFF) << 3) | int(ext.more)
        return struct.pack("!BBHI", next_header, 0, field, ext.ident)
    body_len = (ext.units + 1) * 8 - 2
    if ext.kind in (PROTO_HOPOPTS, PROTO_DSTOPTS):
        # PadN option filling the header: type 1, length body_len - 2.
        body = bytes([1, body_len - 2]) + bytes(body_len - 2)
    elif ext.kind == PROTO_ROUTING:
        # Routing type 253 (experimental), segments left 0, the rest zero.
        body = bytes([253, 0]) + bytes(body_len - 2)
    else:
        body = bytes(body_len)
    return bytes([next_header, ext.units & 0xFF]) + body


def ext_chain(exts: Sequence[Ext], upper_protocol: int, upper: bytes = b"") -> tuple[int, bytes]:
    """(first next-header value, bytes) for `exts` followed by the upper-layer payload."""
    out = upper
    nh = upper_protocol
    for ext in reversed(exts):
        out = ext_header(ext, nh) + out
        nh = ext.kind
    return nh, out


# -- transports ---------------------------------------------------------------

def tcp(sport: int, dport: int, payload: bytes = b"", *, flags: int = TCP_ACK, seq: int = 1, ack: int = 0,
        window: int = 65535, options: bytes = b"", data_offset: int | None = None) -> bytes:
    """A TCP segment; `flags` are the 9 control bits (NS..FIN)."""
    if len(options) % 4:
        options += bytes(4 - len(options) % 4)
    doff = 5 + len(options) // 4 if data_offset is None else data_offset
    off_flags = ((doff & 0xF) << 12) | (flags & 0x1FF)
    return struct.pack("!HHIIHHHH", sport, dport, seq, ack, off_flags, window, 0, 0) + options + payload


def udp(sport: int, dport: int, payload: bytes = b"", *, length: int | None = None) -> bytes:
    ln = 8 + len(payload) if length is None else length
    return struct.pack("!HHHH", sport, dport, ln & 0xFFFF, 0) + payload


def sctp(sport: int, dport: int, payload: bytes = b"", *, vtag: int = 0) -> bytes:
    """SCTP common header (12 bytes); `payload` holds the chunks."""
    return struct.pack("!HHII", sport, dport, vtag, 0) + payload


def icmp(type_: int, code: int, rest: bytes = b"\x00\x01\x00\x01") -> bytes:
    """ICMP (or ICMPv6: same first 4 bytes) message: type, code, checksum 0, then `rest`."""
    return struct.pack("!BBH", type_, code, 0) + rest


def gre(protocol: int = ETH_P_IP, payload: bytes = b"", *, key: int | None = None, checksum: bool = False,
        seq: int | None = None, version: int = 0, routing: bool = False) -> bytes:
    """A GRE header (RFC 2784/2890) carrying `payload`: minimal by default; the C, K and S words when
    asked (checksum, key, seq), in that order."""
    flags = (0x80 if checksum else 0) | (0x40 if routing else 0) | (0x20 if key is not None else 0) | \
        (0x10 if seq is not None else 0)
    out = struct.pack("!BBH", flags, version & 0x07, protocol)
    if checksum:
        out += bytes(4)
    if key is not None:
        out += struct.pack("!I", key)
    if seq is not None:
        out += struct.pack("!I", seq)
    return out + payload


ETH_P_TEB = 0x6558   # transparent Ethernet bridging: an Ethernet frame inside GRE or Geneve
VXLAN_PORT = 4789
GENEVE_PORT = 6081


def vxlan(vni: int, inner: bytes, *, flags: int = 0x08) -> bytes:
    """A VXLAN header (RFC 7348: flags, VNI in bytes 4..6) and the inner Ethernet frame: a UDP payload."""
    return struct.pack("!B3xI", flags, (vni & 0xFFFFFF) << 8) + inner


def geneve(vni: int, inner: bytes, *, protocol: int = ETH_P_TEB, options: bytes = b"", version: int = 0) -> bytes:
    """A Geneve header (RFC 8926) with `options` (a multiple of 4 bytes) and the inner payload."""
    b0 = ((version & 0x3) << 6) | ((len(options) // 4) & 0x3F)
    return struct.pack("!BBHI", b0, 0, protocol, (vni & 0xFFFFFF) << 8) + options + inner


# -- convenience --------------------------------------------------------------

def tcp4(sport: int = 1234, dport: int = 80, *, flags: int = TCP_SYN, payload: bytes = b"",
         vlans: Sequence[tuple[int, int]] = (), **ip: object) -> bytes:
    """Ethernet + IPv4 + TCP in one call; extra keywords go to ipv4()."""
    return ethernet(ETH_P_IP, ipv4(PROTO_TCP, tcp(sport, dport, payload, flags=flags), **ip),  # type: ignore[arg-type]
                    vlans=vlans)


def udp6(sport: int = 5353, dport: int = 53, *, payload: bytes = b"", exts: Sequence[Ext] = (),
         vlans: Sequence[tuple[int, int]] = (), **ip: object) -> bytes:
    """Ethernet + IPv6 (+ extension headers) + UDP in one call; extra keywords go to ipv6()."""
    nh, body = ext_chain(exts, PROTO_UDP, udp(sport, dport, payload))
    return ethernet(ETH_P_IPV6, ipv6(nh, body, **ip), vlans=vlans)  # type: ignore[arg-type]
