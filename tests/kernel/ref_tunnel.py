"""Pure-Python reference of the tunnel rules in xdp/tunnel.h's header comment (XDPFLOW_TUNNELS).

Written from the rules, not from the C; tests/kernel/test_tunnels.py runs both on the same frames.
`parse` returns the reference result of the outer parse (refparser) made the inner flow's when the
packet is a tunnel whose inner packet parses, with the Tunnel the slot's tunnel_ext must hold and
whether the packet counts as tunnel_malformed.

The rules, restated (only once the outer packet is metered with its transport header read):
- VXLAN: UDP to 4789; 8 header bytes within the outer packet; flag I (0x08) set; VNI bytes 4..6;
  then an Ethernet frame.
- Geneve: UDP to 6081; 8 header bytes; version (b0 >> 6) 0; (b0 & 0x3f) * 4 option bytes; VNI
  bytes 4..6; protocol type (bytes 2..3) 0x6558 Ethernet, 0x0800 IPv4, 0x86DD IPv6.
- GRE: IP protocol 47; 4 header bytes; version (b1 & 7) 0 and routing (0x40) clear, else not a
  tunnel; + 4 bytes each for C (0x80), K (0x20, the key, read) and S (0x10); protocol 0x0800,
  0x86DD or 0x6558.
- An inner Ethernet header: 14 bytes within the outer packet, ethertype IPv4 or IPv6.
- Other inner protocols: not a tunnel. Truncated headers, VXLAN without I, Geneve version != 0, an
  inner packet starting past the outer one or at byte MAX_OFF of the frame or later, or failing the
  IP rules within the outer packet's bytes: malformed, metered as the outer flow.
- Decapsulated: the inner packet's key (outer VLAN, segment = id & 0xffffff little-endian), tos,
  ttl, TCP flags; the outer packet's octets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tests.kernel import refparser as ref

VXLAN_PORT = 4789
GENEVE_PORT = 6081
ETH_P_TEB = 0x6558
MAX_OFF = 1024          # XDPFLOW_TUNNEL_MAX_OFF in xdp/tunnel.h
NONE, VXLAN, GENEVE, GRE, GRE_KEY = range(5)   # XDPFLOW_TUNNEL_* in xdp/flow.h


@dataclass(frozen=True)
class Tunnel:
    """What the slot's tunnel_ext holds (xdp/flow.h struct tunnel_ext)."""

    outer_src: bytes
    outer_dst: bytes
    tunnel_id: int
    type: int
    outer_ip_version: int


@dataclass(frozen=True)
class TunnelResult:
    result: ref.Result
    tunnel: Tunnel | None = None
    malformed: bool = False


class _Malformed(Exception):
    pass


def _u16(b: bytes, off: int) -> int:
    return (b[off] << 8) | b[off + 1]


def parse(frame: bytes, ifindex: int = 1, direction: int = ref.INGRESS) -> TunnelResult:
    outer = ref.parse(frame, ifindex, direction)
    if not isinstance(outer, ref.Metered) or outer.l4 < 0:
        return TunnelResult(outer)
    try:
        found = _tunnel(frame[:outer.end], outer)
    except _Malformed:
        return TunnelResult(outer, malformed=True)
    if found is None:
        return TunnelResult(outer)
    inner_at, proto, type_, tunnel_id = found
    if inner_at > outer.end or inner_at >= MAX_OFF:
        return TunnelResult(outer, malformed=True)
    inner = ref.parse_ip(frame[inner_at:outer.end], ifindex, outer.key.vlan_id, 4 if proto == ref.ETH_P_IP else 6)
    if not isinstance(inner, ref.Metered):
        return TunnelResult(outer, malformed=True)
    key = dataclasses.replace(inner.key, direction=outer.key.direction,
                              segment=(tunnel_id & 0xFFFFFF).to_bytes(3, "little"))
    l4 = inner.l4 + inner_at if inner.l4 >= 0 else -1
    metered = dataclasses.replace(inner, key=key, octets=outer.octets, l4=l4, end=inner.end + inner_at)
    tunnel = Tunnel(outer.key.src_addr, outer.key.dst_addr, tunnel_id, type_, outer.key.ip_version)
    return TunnelResult(metered, tunnel)


def _tunnel(packet: bytes, outer: ref.Metered) -> tuple[int, int, int, int] | None:
    """(inner IP offset, its ethertype, tunnel type, id), None when not a tunnel; _Malformed."""
    key, l4 = outer.key, outer.l4

    def need(at: int, n: int) -> None:
        if at + n > len(packet):
            raise _Malformed

    if key.protocol == ref.IPPROTO_UDP and key.dst_port in (VXLAN_PORT, GENEVE_PORT):
        h = l4 + 8
        need(h, 8)
        tunnel_id = int.from_bytes(packet[h + 4:h + 7], "big")
        if key.dst_port == VXLAN_PORT:
            if not packet[h] & 0x08:
                raise _Malformed
            type_, inner, proto = VXLAN, h + 8, ETH_P_TEB
        else:
            if packet[h] >> 6:
                raise _Malformed
            type_, inner, proto = GENEVE, h + 8 + (packet[h] & 0x3F) * 4, _u16(packet, h + 2)
    elif key.protocol == 47:
        need(l4, 4)
        flags = packet[l4]
        if packet[l4 + 1] & 0x07 or flags & 0x40:
            return None
        proto = _u16(packet, l4 + 2)
        opt = l4 + 4 + (4 if flags & 0x80 else 0)
        type_, tunnel_id = GRE, 0
        if flags & 0x20:
            need(opt, 4)
            tunnel_id = int.from_bytes(packet[opt:opt + 4], "big")
            type_ = GRE_KEY
            opt += 4
        inner = opt + (4 if flags & 0x10 else 0)
    else:
        return None
    if proto == ETH_P_TEB:
        need(inner, ref.ETH_HLEN)
        proto = _u16(packet, inner + 12)
        inner += ref.ETH_HLEN
    if proto not in (ref.ETH_P_IP, ref.ETH_P_IPV6):
        return None
    return inner, proto, type_, tunnel_id
