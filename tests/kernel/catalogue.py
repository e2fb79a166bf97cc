"""Frames for the kernel parser tests: a hand-checked catalogue with its expectations, and the
hypothesis strategies of the differential fuzz (valid, malformed and raw frames)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st

from tests.kernel import frames as fr
from tests.kernel import refparser as ref
from tests.kernel.harness import FUZZ_EXAMPLES
from tests.kernel.refparser import Metered, Verdict

# -- a hand-checked catalogue ----------------------------------------------------------

M4 = b"\x00" * 10 + b"\xff\xff"
Expect = Verdict | dict[str, int]
FAIL = Verdict.PARSE_FAILURE
NON_IP = Verdict.NON_IP


def frame_v4(proto: int, l4: bytes = b"", vlans: Sequence[tuple[int, int]] = (), **ip: object) -> bytes:
    return fr.ethernet(fr.ETH_P_IP, fr.ipv4(proto, l4, **ip), vlans=vlans)  # type: ignore[arg-type]


def frame_v6(proto: int, l4: bytes = b"", exts: Sequence[fr.Ext] = (), vlans: Sequence[tuple[int, int]] = (),
        **ip: object) -> bytes:
    nh, body = fr.ext_chain(exts, proto, l4)
    return fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(nh, body, **ip), vlans=vlans)  # type: ignore[arg-type]


HBH = fr.Ext(fr.PROTO_HOPOPTS)
RT = fr.Ext(fr.PROTO_ROUTING, units=2)
DST = fr.Ext(fr.PROTO_DSTOPTS, units=1)
FRAG0 = fr.Ext(fr.PROTO_FRAGMENT, more=True)
FRAGN = fr.Ext(fr.PROTO_FRAGMENT, frag_offset=185)
TCP20 = fr.tcp(1234, 80, flags=fr.TCP_SYN)
UDP8 = fr.udp(5353, 53)
CHAIN6 = [HBH, DST, RT, FRAG0, DST, DST]

CATALOGUE: list[tuple[str, bytes, Expect]] = [
    ("v4-tcp-syn", frame_v4(6, TCP20), {"ip_version": 4, "protocol": 6, "src_port": 1234, "dst_port": 80,
                                   "octets": 40, "tcp_flags": fr.TCP_SYN, "ttl": 64, "vlan_id": 0}),
    ("v4-tcp-all-9-flags-doff15", frame_v4(6, fr.tcp(1, 2, b"x", flags=0x1FF, options=bytes(40))),
     {"tcp_flags": 0x1FF, "octets": 20 + 60 + 1}),
    ("v4-tcp-reserved-bits-ignored", frame_v4(6, fr.tcp(1, 2, flags=0xE00 | fr.TCP_FIN)), {"tcp_flags": fr.TCP_FIN}),
    ("v4-udp", frame_v4(17, fr.udp(40000, 4739, b"hello")), {"protocol": 17, "src_port": 40000, "dst_port": 4739,
                                                        "octets": 33, "tcp_flags": 0}),
    ("v4-sctp", frame_v4(132, fr.sctp(2905, 2906)), {"protocol": 132, "src_port": 2905, "dst_port": 2906}),
    ("v4-icmp-echo", frame_v4(1, fr.icmp(8, 0)), {"protocol": 1, "src_port": 0, "dst_port": 0x0800}),
    ("v4-icmp-unreach", frame_v4(1, fr.icmp(3, 1, b"")), {"protocol": 1, "src_port": 0, "dst_port": 0x0301}),
    ("v4-carrying-icmpv6-no-ports", frame_v4(58, fr.icmp(128, 0)), {"protocol": 58, "dst_port": 0}),
    ("v4-gre", frame_v4(47, fr.gre(payload=b"\x45" + bytes(19))), {"protocol": 47, "src_port": 0, "dst_port": 0}),
    ("v4-esp", frame_v4(50, bytes(16)), {"protocol": 50, "dst_port": 0}),
    ("v4-proto-255-empty", frame_v4(255), {"protocol": 255, "octets": 20}),
    ("v4-tos-ttl", frame_v4(17, UDP8, tos=0xB9, ttl=1), {"tos": 0xB9, "ttl": 1}),
    ("v4-options-ihl15", frame_v4(17, UDP8, options=bytes([1] * 40)), {"dst_port": 53, "octets": 68}),
    ("v4-options-ihl6", frame_v4(6, TCP20, options=b"\x94\x04\x00\x00"), {"dst_port": 80, "octets": 44}),
    ("v4-ethernet-padding", fr.ethernet(fr.ETH_P_IP, fr.ipv4(17, UDP8), pad_to=60), {"octets": 28}),
    ("v4-trailing-garbage", frame_v4(17, UDP8) + b"\xff" * 100, {"octets": 28, "dst_port": 53}),
    ("v4-addresses-mapped", frame_v4(17, UDP8, src=bytes([10, 1, 2, 3]), dst=bytes([255, 255, 255, 255])),
     {"src_addr": int.from_bytes(M4 + bytes([10, 1, 2, 3])), "dst_addr": int.from_bytes(M4 + b"\xff" * 4)}),
    ("v4-first-fragment", frame_v4(6, TCP20 + bytes(100), flags=fr.IPV4_MF), {"src_port": 1234, "dst_port": 80}),
    ("v4-df-set", frame_v4(6, TCP20, flags=fr.IPV4_DF), {"dst_port": 80}),
    ("v4-non-first-fragment", frame_v4(6, TCP20, frag_offset=185), {"protocol": 6, "src_port": 0, "dst_port": 0,
                                                                "tcp_flags": 0, "octets": 40}),
    ("v4-last-fragment-empty", frame_v4(17, frag_offset=1), {"protocol": 17, "dst_port": 0, "octets": 20}),
    ("v4-max-fragment-offset", frame_v4(17, b"abc", frag_offset=0x1FFF, flags=fr.IPV4_MF), {"dst_port": 0}),
    ("v4-tiny-first-fragment", frame_v4(6, TCP20[:8], flags=fr.IPV4_MF), FAIL),
    ("v4-tcp-19-bytes", frame_v4(6, TCP20[:19]), FAIL),
    ("v4-udp-7-bytes", frame_v4(17, UDP8[:7]), FAIL),
    ("v4-sctp-11-bytes", frame_v4(132, fr.sctp(1, 2)[:11]), FAIL),
    ("v4-icmp-3-bytes", frame_v4(1, fr.icmp(8, 0)[:3]), FAIL),
    ("v4-icmp-4-bytes", frame_v4(1, fr.icmp(8, 0)[:4]), {"dst_port": 0x0800, "octets": 24}),
    ("v4-udp-cut-by-total-length", frame_v4(17, UDP8, total_length=27), FAIL),
    ("v4-total-length-past-frame", frame_v4(17, UDP8, total_length=29), FAIL),
    ("v4-total-length-below-header", frame_v4(255, total_length=19), FAIL),
    ("v4-total-length-below-options", frame_v4(255, bytes(8), options=bytes(8), total_length=24), FAIL),
    ("v4-total-length-0", frame_v4(17, UDP8, total_length=0), FAIL),
    ("v4-ihl-0", frame_v4(17, UDP8, ihl=0), FAIL),
    ("v4-ihl-4", frame_v4(17, UDP8, ihl=4), FAIL),
    ("v4-ihl-past-frame", frame_v4(255, ihl=15, total_length=20), FAIL),
    ("v4-ihl-6-shifts-ports", frame_v4(17, UDP8 + b"\x00\x07\x00\x08", ihl=6), {"src_port": 8, "dst_port": 0,
                                                                             "octets": 32}),
    ("v4-version-6", frame_v4(17, UDP8, version=6), FAIL),
    ("v4-header-19-bytes", fr.ethernet(fr.ETH_P_IP, fr.ipv4(17, UDP8)[:19]), FAIL),
    ("eth-only-ip", fr.ethernet(fr.ETH_P_IP), FAIL),
    ("eth-only-ipv6", fr.ethernet(fr.ETH_P_IPV6), FAIL),
    ("eth-only-arp", fr.ethernet(fr.ETH_P_ARP), NON_IP),
    ("arp", fr.ethernet(fr.ETH_P_ARP, fr.arp_request(), pad_to=60), NON_IP),
    ("lldp", fr.ethernet(fr.ETH_P_LLDP, bytes(40)), NON_IP),
    ("mpls", fr.ethernet(fr.ETH_P_MPLS, bytes(4) + fr.ipv4(17, UDP8)), NON_IP),
    ("802.3-length-field", fr.ethernet(46, bytes(46)), NON_IP),
    ("vlan1", frame_v4(17, UDP8, vlans=[fr.vlan(100)]), {"vlan_id": 100, "dst_port": 53}),
    ("vlan1-pcp-dei-vid4095", frame_v4(17, UDP8, vlans=[fr.vlan(4095, pcp=7, dei=1)]), {"vlan_id": 4095}),
    ("vlan1-vid0-priority-tag", frame_v6(17, UDP8, vlans=[fr.vlan(0, pcp=5)]), {"vlan_id": 0, "ip_version": 6}),
    ("qinq-88a8", frame_v4(17, UDP8, vlans=[fr.vlan(200, fr.ETH_P_8021AD), fr.vlan(300)]), {"vlan_id": 200}),
    ("qinq-8100-8100", frame_v6(6, TCP20, vlans=[fr.vlan(7), fr.vlan(8)]), {"vlan_id": 7, "dst_port": 80}),
    ("qinq-88a8-88a8", frame_v4(17, UDP8, vlans=[fr.vlan(1, fr.ETH_P_8021AD), fr.vlan(2, fr.ETH_P_8021AD)]),
     {"vlan_id": 1}),
    ("vlan-depth-3", frame_v4(17, UDP8, vlans=[fr.vlan(1), fr.vlan(2), fr.vlan(3)]), FAIL),
    ("vlan-depth-3-arp", fr.ethernet(fr.ETH_P_ARP, fr.arp_request(), vlans=[fr.vlan(1)] * 3), FAIL),
    ("vlan-arp", fr.ethernet(fr.ETH_P_ARP, fr.arp_request(), vlans=[fr.vlan(10)]), NON_IP),
    ("vlan-tag-truncated", fr.ethernet(fr.ETH_P_8021Q)[:14] + b"\x00\x64\x08", FAIL),
    ("vlan-then-nothing", fr.ethernet(fr.ETH_P_IP, vlans=[fr.vlan(5)]), FAIL),
    ("v6-udp", frame_v6(17, UDP8), {"ip_version": 6, "protocol": 17, "src_port": 5353, "dst_port": 53, "octets": 48,
                               "src_addr": int.from_bytes(fr.SRC6), "dst_addr": int.from_bytes(fr.DST6)}),
    ("v6-tcp", frame_v6(6, fr.tcp(5, 6, flags=fr.TCP_ACK | fr.TCP_PSH)), {"tcp_flags": 0x18}),
    ("v6-sctp", frame_v6(132, fr.sctp(7, 8)), {"src_port": 7, "dst_port": 8}),
    ("v6-icmpv6-echo", frame_v6(58, fr.icmp(128, 0)), {"protocol": 58, "dst_port": 0x8000}),
    ("v6-carrying-icmp-no-ports", frame_v6(1, fr.icmp(8, 0)), {"protocol": 1, "dst_port": 0}),
    ("v6-no-next-header", frame_v6(59), {"protocol": 59, "octets": 40}),
    ("v6-tclass-flowlabel-hoplimit", frame_v6(17, UDP8, traffic_class=0xB9, flow_label=0xFFFFF, hop_limit=255),
     {"tos": 0xB9, "ttl": 255}),
    ("v6-padding", fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(17, UDP8) + bytes(30)), {"octets": 48}),
    ("v6-payload-length-past-frame", frame_v6(17, UDP8, payload_length=9), FAIL),
    ("v6-payload-length-cuts-udp", frame_v6(17, UDP8, payload_length=7), FAIL),
    ("v6-payload-length-0-udp", frame_v6(17, UDP8, payload_length=0), FAIL),
    ("v6-version-4", frame_v6(17, UDP8, version=4), FAIL),
    ("v6-header-39-bytes", fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(59)[:39]), FAIL),
    ("v6-hbh-udp", frame_v6(17, UDP8, [HBH]), {"protocol": 17, "dst_port": 53, "octets": 56}),
    ("v6-routing-tcp", frame_v6(6, TCP20, [RT]), {"protocol": 6, "dst_port": 80}),
    ("v6-dstopts-icmpv6", frame_v6(58, fr.icmp(135, 0), [DST]), {"protocol": 58, "dst_port": 135 << 8}),
    ("v6-5-exts", frame_v6(17, UDP8, CHAIN6[:5]), {"dst_port": 53}),
    ("v6-6-exts", frame_v6(17, UDP8, CHAIN6), {"dst_port": 53}),
    ("v6-7-exts", frame_v6(17, UDP8, [*CHAIN6, HBH]), FAIL),
    ("v6-8-exts", frame_v6(17, UDP8, [*CHAIN6, DST, DST]), FAIL),
    ("v6-6-exts-then-no-next", frame_v6(59, b"", CHAIN6), {"protocol": 59}),
    ("v6-first-fragment", frame_v6(17, UDP8 + bytes(64), [FRAG0]), {"protocol": 17, "dst_port": 53}),
    ("v6-non-first-fragment", frame_v6(6, TCP20, [FRAGN]), {"protocol": 6, "src_port": 0, "dst_port": 0,
                                                       "tcp_flags": 0, "octets": 68}),
    ("v6-non-first-fragment-of-icmpv6", frame_v6(58, b"", [HBH, FRAGN]), {"protocol": 58, "dst_port": 0}),
    ("v6-non-first-fragment-6th", frame_v6(17, b"", [*CHAIN6[:5], FRAGN]), {"protocol": 17, "dst_port": 0}),
    ("v6-non-first-fragment-7th", frame_v6(17, b"", [*CHAIN6, FRAGN]), FAIL),
    ("v6-non-first-fragment-then-ext", frame_v6(17, b"", [FRAGN, HBH]), {"protocol": 0, "dst_port": 0}),
    ("v6-fragment-header-cut", fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(44, bytes([17]) + bytes(6))), FAIL),
    ("v6-ext-past-packet", fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(60, bytes([59, 1]) + bytes(10))), FAIL),
    ("v6-ext-len-byte-missing", fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(0, bytes([59])) + bytes(20)), FAIL),
    ("v6-ext-exactly-fills-packet", fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(0, bytes([59, 0]) + bytes(6))),
     {"protocol": 59, "octets": 48}),
    ("v6-ext-then-udp-missing", fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(0, bytes([17, 0]) + bytes(6))), FAIL),
    ("v6-ext-past-packet-within-frame",
     fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(0, bytes([59, 1]) + bytes(6), payload_length=8) + bytes(40)), FAIL),
    ("v6-ah-not-skipped", frame_v6(51, bytes(24)), {"protocol": 51, "dst_port": 0}),
    ("v6-in-vlan", frame_v6(17, UDP8, [HBH], vlans=[fr.vlan(42)]), {"vlan_id": 42}),
]


def check_expectation(got: ref.Result, want: Expect) -> None:
    if isinstance(want, Verdict):
        assert got is want
        return
    assert isinstance(got, Metered), got
    fields = {"octets": got.octets, "tcp_flags": got.tcp_flags, "tos": got.tos, "ttl": got.ttl,
              "src_port": got.key.src_port, "dst_port": got.key.dst_port, "protocol": got.key.protocol,
              "ip_version": got.key.ip_version, "vlan_id": got.key.vlan_id, "ifindex": got.key.ifindex,
              "src_addr": int.from_bytes(got.key.src_addr), "dst_addr": int.from_bytes(got.key.dst_addr)}
    assert {k: fields[k] for k in want} == want


# -- differential fuzz ----------------------------------------------------------------

PORTS = st.one_of(st.sampled_from([0, 53, 80, 443, 1234, 65535]), st.integers(0, 65535))
ADDR4 = st.one_of(st.sampled_from([fr.SRC4, fr.DST4]), st.binary(min_size=4, max_size=4))
ADDR6 = st.one_of(st.sampled_from([fr.SRC6, fr.DST6]), st.binary(min_size=16, max_size=16))
# Mostly short payloads; sometimes up to a 1500 MTU; sometimes jumbo (beyond the linear part, see above).
PAYLOAD = st.one_of(st.binary(max_size=48), st.binary(max_size=48), st.binary(max_size=48),
                    st.integers(49, 1500).map(lambda n: b"\xa5" * n),
                    st.integers(1501, 9000).map(lambda n: b"\x5a" * n))
ETHERTYPES_NON_IP = st.one_of(st.sampled_from([fr.ETH_P_ARP, fr.ETH_P_LLDP, fr.ETH_P_MPLS, 0x88E5, 0x0000, 0xFFFF]),
                              st.integers(0, 0xFFFF).filter(lambda t: t not in (0x0800, 0x86DD, 0x8100, 0x88A8)))


PARSED_PROTOS = (*fr.IPV6_EXT_PROTOS, fr.PROTO_ICMP, fr.PROTO_TCP, fr.PROTO_UDP, fr.PROTO_ICMPV6, fr.PROTO_SCTP)
OTHER_PROTOS = st.sampled_from([p for p in range(256) if p not in PARSED_PROTOS])


@st.composite
def transport(draw: st.DrawFn, version: int) -> tuple[int, bytes]:
    kind = draw(st.sampled_from(["tcp", "udp", "sctp", "icmp", "other-icmp", "gre", "none", "any"]))
    payload = draw(PAYLOAD)
    sport, dport = draw(PORTS), draw(PORTS)
    if kind == "tcp":
        return fr.PROTO_TCP, fr.tcp(sport, dport, payload, flags=draw(st.integers(0, 0xFFF)),
                                    options=draw(st.binary(max_size=40)))
    if kind == "udp":
        return fr.PROTO_UDP, fr.udp(sport, dport, payload)
    if kind == "sctp":
        return fr.PROTO_SCTP, fr.sctp(sport, dport, payload)
    if kind in ("icmp", "other-icmp"):
        icmp4 = (kind == "icmp") == (version == 4)
        return (fr.PROTO_ICMP if icmp4 else fr.PROTO_ICMPV6), fr.icmp(draw(st.integers(0, 255)),
                                                                      draw(st.integers(0, 255)), payload)
    if kind == "gre":
        return fr.PROTO_GRE, fr.gre(fr.ETH_P_IP, payload)
    if kind == "none":
        return fr.PROTO_NONE, payload
    return draw(OTHER_PROTOS), payload


def ext(valid: bool) -> st.SearchStrategy[fr.Ext]:
    offsets = st.just(0) if valid else st.one_of(st.just(0), st.integers(1, 0x1FFF))
    return st.one_of(
        st.builds(fr.Ext, st.sampled_from([fr.PROTO_HOPOPTS, fr.PROTO_ROUTING, fr.PROTO_DSTOPTS]),
                  units=st.integers(0, 4)),
        st.builds(fr.Ext, st.just(fr.PROTO_FRAGMENT), frag_offset=offsets, more=st.booleans()),
    )


@dataclass(frozen=True)
class IpSpec:
    """A drawn frame, buildable with its IP length field (IPv4 total / IPv6 payload length) and IPv4 IHL
    overridden (None: the true value). `headers`: the length value that ends the packet right after its
    IP headers, before the transport header."""

    build: Callable[[int | None, int | None], bytes]
    headers: int
    version: int


@st.composite
def ip_builder(draw: st.DrawFn, valid: bool, liar: str = "none") -> IpSpec:
    """Draw an Ethernet [+ tags] + IPv4/IPv6 [+ extension headers] + transport frame.

    `liar` "version" makes the version field lie; not valid also allows 3 VLAN tags and IPv6 chains
    2 beyond the limit, and non-first IPv6 fragment headers anywhere in the chain.
    """
    depth = draw(st.integers(0, ref.VLAN_MAX_DEPTH if valid else 3))
    vlans = [fr.vlan(draw(st.integers(0, 4095)), draw(st.sampled_from([fr.ETH_P_8021Q, fr.ETH_P_8021AD])),
                     pcp=draw(st.integers(0, 7))) for _ in range(depth)]
    version = draw(st.sampled_from([4, 6]))
    proto, l4 = draw(transport(version))
    pad_to = draw(st.one_of(st.just(0), st.just(fr.ETH_MIN_FRAME), st.integers(0, 200)))

    def lie(name: str) -> int | None:
        return draw(st.integers(0, 15)) if liar == name else None

    if version == 4:
        options = draw(st.binary(max_size=40))
        fields = {"src": draw(ADDR4), "dst": draw(ADDR4), "tos": draw(st.integers(0, 255)),
                  "ttl": draw(st.integers(0, 255)), "ident": draw(st.integers(0, 0xFFFF)),
                  "flags": draw(st.integers(0, 7)), "frag_offset": draw(st.one_of(st.just(0), st.just(0),
                                                                                   st.integers(1, 0x1FFF))),
                  "version": lie("version") or 4}

        def build4(length: int | None, ihl: int | None) -> bytes:
            l3 = fr.ipv4(proto, l4, options=options, total_length=length, ihl=ihl, **fields)  # type: ignore[arg-type]
            return fr.ethernet(fr.ETH_P_IP, l3, vlans=vlans, pad_to=pad_to)

        return IpSpec(build4, 20 + -(-len(options) // 4) * 4, 4)

    # Chain lengths uniform over 0..limit (valid) or 0..limit + 2, so the limit itself is hit often.
    n_ext = draw(st.integers(0, ref.IPV6_MAX_EXT if valid else ref.IPV6_MAX_EXT + 2))
    exts = draw(st.lists(ext(valid), min_size=n_ext, max_size=n_ext))
    nh, body = fr.ext_chain(exts, proto, l4)
    fields6 = {"src": draw(ADDR6), "dst": draw(ADDR6), "traffic_class": draw(st.integers(0, 255)),
               "flow_label": draw(st.integers(0, 0xFFFFF)), "hop_limit": draw(st.integers(0, 255)),
               "version": lie("version") or 6}

    def build6(length: int | None, ihl: int | None) -> bytes:
        del ihl  # IPv4 only
        l3 = fr.ipv6(nh, body, payload_length=length, **fields6)  # type: ignore[arg-type]
        return fr.ethernet(fr.ETH_P_IPV6, l3, vlans=vlans, pad_to=pad_to)

    return IpSpec(build6, len(body) - len(l4), 6)


# Where a packet cut short by its own length field is most interesting: around the minimum sizes of the
# transport headers (4 ICMP, 8 UDP, 12 SCTP, 20 TCP) past the IP headers.
CUTS = st.one_of(st.sampled_from([0, 3, 4, 7, 8, 11, 12, 19, 20]), st.integers(-4, 24))


@st.composite
def ip_frame(draw: st.DrawFn, valid: bool) -> bytes:
    """A drawn IP frame; when not valid, at most one header field lies, so each rule is tested with the others
    holding. A length lie is any 16-bit value or one that ends the packet near the end of its IP headers
    (inside the transport header, most often), while the frame still holds the true bytes."""
    liar = "none" if valid else draw(st.sampled_from(["none", "ihl", "length", "length", "version"]))
    spec = draw(ip_builder(valid, liar))
    length = ihl = None
    if liar == "length":
        length = draw(st.one_of(st.integers(0, 0xFFFF), CUTS.map(lambda c: max(0, spec.headers + c))))
    elif liar == "ihl":
        ihl = draw(st.one_of(st.integers(0, 15), st.integers(0, 5)))  # often just below the minimum, 5
    return spec.build(length, ihl)


@st.composite
def non_ip_frame(draw: st.DrawFn) -> bytes:
    vlans = [fr.vlan(draw(st.integers(0, 4095))) for _ in range(draw(st.integers(0, ref.VLAN_MAX_DEPTH)))]
    return fr.ethernet(draw(ETHERTYPES_NON_IP), draw(st.binary(max_size=64)), vlans=vlans,
                       pad_to=draw(st.sampled_from([0, fr.ETH_MIN_FRAME])))


@st.composite
def mutated(draw: st.DrawFn, frame: st.SearchStrategy[bytes]) -> bytes:
    """A frame cut, overwritten or extended at random places (most often in the headers)."""
    out = bytearray(draw(frame))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "overwrite", "overwrite", "extend"]))
        if op == "truncate" and out:
            del out[draw(st.integers(0, len(out) - 1)):]
        elif op == "overwrite" and out:
            i = draw(st.integers(0, min(len(out), 120) - 1))
            out[i] = draw(st.integers(0, 255))
        else:
            out += draw(st.binary(min_size=1, max_size=64))
    return bytes(out)


@st.composite
def raw_frame(draw: st.DrawFn) -> bytes:
    """Random bytes after an IP, IPv6 or VLAN ethertype; often with the IP version and lengths made plausible."""
    ethertype = draw(st.sampled_from([0x0800, 0x86DD, 0x8100, 0x88A8]))
    plausible = draw(st.booleans())
    body = bytearray(draw(st.binary(min_size=40 if plausible else 0, max_size=160)))
    if plausible:
        if ethertype == 0x0800:
            body[0] = 0x40 | draw(st.integers(5, 15))
            body[2:4] = draw(st.integers(20, len(body))).to_bytes(2, "big")
        elif ethertype == 0x86DD:
            body[0] = 0x60 | (body[0] & 0x0F)
            body[4:6] = draw(st.integers(0, len(body) - 40)).to_bytes(2, "big")
            body[6] = draw(st.sampled_from([*fr.IPV6_EXT_PROTOS, body[6]]))
    return fr.ethernet(ethertype, bytes(body))


@st.composite
def one_flow(draw: st.DrawFn) -> list[bytes]:
    """Packets of one flow whose TTL, ToS, TCP flags and sizes vary: the hit path's min/max/OR/first."""
    version = draw(st.sampled_from([4, 6]))
    vlans = [fr.vlan(draw(st.integers(0, 4095))) for _ in range(draw(st.integers(0, ref.VLAN_MAX_DEPTH)))]
    kind = draw(st.sampled_from(["tcp", "udp", "icmp", "other"]))
    sport, dport = draw(PORTS), draw(PORTS)
    src, dst = (draw(ADDR4), draw(ADDR4)) if version == 4 else (draw(ADDR6), draw(ADDR6))
    exts = draw(st.lists(ext(valid=True), max_size=3)) if version == 6 else []
    other = draw(OTHER_PROTOS)
    packets = []
    for _ in range(draw(st.integers(1, 8))):
        payload = bytes(draw(st.integers(0, 1400)))
        if kind == "tcp":
            proto, l4 = fr.PROTO_TCP, fr.tcp(sport, dport, payload, flags=draw(st.integers(0, 0x1FF)))
        elif kind == "udp":
            proto, l4 = fr.PROTO_UDP, fr.udp(sport, dport, payload)
        elif kind == "icmp":
            proto = fr.PROTO_ICMP if version == 4 else fr.PROTO_ICMPV6
            l4 = fr.icmp(sport >> 8, sport & 0xFF, payload)
        else:
            proto, l4 = other, payload
        tos, ttl = draw(st.integers(0, 255)), draw(st.integers(0, 255))
        if version == 4:
            l3 = fr.ipv4(proto, l4, src=src, dst=dst, tos=tos, ttl=ttl)
        else:
            nh, body = fr.ext_chain(exts, proto, l4)
            l3 = fr.ipv6(nh, body, src=src, dst=dst, traffic_class=tos, hop_limit=ttl)
        packets.append(fr.ethernet(fr.ETH_P_IP if version == 4 else fr.ETH_P_IPV6, l3, vlans=vlans))
    return packets


VALID = st.one_of(ip_frame(valid=True), non_ip_frame())
MALFORMED = st.one_of(ip_frame(valid=False), mutated(ip_frame(valid=True)), mutated(ip_frame(valid=False)),
                      mutated(non_ip_frame()))
def tally_events(results: Sequence[ref.Result]) -> None:
    """Outcome mix, shown by --hypothesis-show-statistics."""
    for r in results:
        event(r.name if isinstance(r, Verdict) else f"metered v{r.key.ip_version}")


FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
