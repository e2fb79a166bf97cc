"""Enterprise information elements xdpflow exports, in one list the encoder and the built-in
collector both register (the `ipfix` package knows IANA and RFC 5103 only).

Tunnels (issue 14): IANA has layer2SegmentId (351), greKey (296) and tunnelTechnology (289) but no
element for a tunnel's outer addresses. ntop's elements (PEN 35632) fill that gap, and Wireshark
(tshark), nProbe and ntopng decode them by name: UNTUNNELED_* are the addresses of the packet
outside the tunnel (the "untunnelled" header: the one a tunnel-blind probe would have metered),
beside a flow whose key is the inner packet's; UPSTREAM_TUNNEL_ID is the tunnel's own id (VNI or GRE
key) whatever its technology, for Geneve, which layer2SegmentId has no type code for.
"""

from __future__ import annotations

import ipfix.ie

NTOP_PEN = 35632

SPECS = (
    f"UPSTREAM_TUNNEL_ID({NTOP_PEN}/106)<unsigned32>[4]",
    f"UNTUNNELED_IPV4_SRC_ADDR({NTOP_PEN}/114)<ipv4Address>[4]",
    f"UNTUNNELED_IPV4_DST_ADDR({NTOP_PEN}/116)<ipv4Address>[4]",
    f"UNTUNNELED_IPV6_SRC_ADDR({NTOP_PEN}/396)<ipv6Address>[16]",
    f"UNTUNNELED_IPV6_DST_ADDR({NTOP_PEN}/397)<ipv6Address>[16]",
)


def register() -> None:
    """Add SPECS to the `ipfix` package's registry (idempotent)."""
    for spec in SPECS:
        ipfix.ie.for_spec(spec)
