"""BPF_PROG_TEST_RUN tunnel tests (XDPFLOW_TUNNELS): xdp/tunnel.h held equal to tests/kernel/ref_tunnel.py.

The program compiled with the tunnels feature runs every frame once (the harness of the parser
tests, with ref_tunnel as its reference): per frame the counters, tunnel_decapsulated and
tunnel_malformed among them, move as the reference says; per batch the drained flows are the
reference's, inner keys and segment included, and each slot's tunnel_ext holds the outer addresses,
id and type of its flow's last decapsulated packet (all zero for a flow that was not).
Truncation: of the frame at every offset, and of the tunnel payload at every offset with the outer
headers rebuilt around it (so the outer packet stays valid and only the inner part is cut).
Feature off: the same frames through the default program are their outer flows, as before.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.kernel import frames as fr
from tests.kernel import ref_tunnel as rt
from tests.kernel import refparser as ref
from tests.kernel.catalogue import FUZZ, VALID, frame_v4, frame_v6, ip_frame, mutated
from tests.kernel.harness import FLOW_H, Harness, loaded_harness
from tests.kernel.refparser import FlowKey, Metered
from xdp.layout import TUNNEL_EXT

pytestmark = pytest.mark.kernel

COUNTERS = ("tunnel_decapsulated", "tunnel_malformed")
INNER_TCP = fr.tcp4(40000, 443, flags=fr.TCP_SYN, src=bytes([10, 0, 0, 1]), dst=bytes([10, 0, 0, 2]))
INNER_UDP6 = fr.udp6(5353, 53, payload=b"q" * 12, src=bytes.fromhex("fd00" + "00" * 13 + "01"),
                     dst=bytes.fromhex("fd00" + "00" * 13 + "02"))
ARP = fr.arp_request()


def _expect(view: bytes, direction: int) -> dict[str, int]:
    r = rt.parse(view, 1, direction)
    return {"tunnel_decapsulated": int(r.tunnel is not None), "tunnel_malformed": int(r.malformed)}


@pytest.fixture(scope="module")
def tunnels() -> Iterator[Harness]:
    for h in loaded_harness(features=("tunnels",)):
        h.reference = lambda view, ifindex, direction: rt.parse(view, ifindex, direction).result
        h.extra_counters = COUNTERS
        h.expect_extra = _expect
        yield h


def run(h: Harness, batch: Sequence[bytes], direction: int = ref.INGRESS) -> list[rt.TunnelResult]:
    """Run the batch, check what the harness checks, then every slot's tunnel_ext."""
    h.run(batch, direction=direction)
    results = [rt.parse(h.view(f, direction), 1, direction) for f in batch]
    last: dict[FlowKey, rt.Tunnel | None] = {}
    for r in results:
        if isinstance(r.result, Metered):
            key = r.result.key
            if r.tunnel is not None or key not in last:
                last[key] = r.tunnel if r.tunnel is not None else last.get(key)
    slots, exts = h.last_slots, h.last_exts["tunnels"]
    assert slots is not None and len(exts) == len(slots)
    for slot, ext in zip(slots, exts, strict=True):
        key = FlowKey.unpack(slot["key"].tobytes())
        want = last[key]
        got = rt.Tunnel(bytes(ext["outer_src"]), bytes(ext["outer_dst"]), int(ext["tunnel_id"]), int(ext["type"]),
                        int(ext["outer_ip_version"]))
        assert not ext["pad"].any()
        if want is None:
            assert ext.tobytes() == bytes(TUNNEL_EXT.itemsize), f"{key}: not tunnelled, yet {got}"
        else:
            assert got == want, f"{key}: tunnel_ext {got}, expected {want}"
    return results


def vxlan4(inner: bytes, vni: int = 4242, **kw: object) -> bytes:
    return frame_v4(17, fr.udp(51000, fr.VXLAN_PORT, fr.vxlan(vni, inner, **kw)))  # type: ignore[arg-type]


def geneve6(inner: bytes, vni: int = 77, **kw: object) -> bytes:
    return frame_v6(17, fr.udp(51000, fr.GENEVE_PORT, fr.geneve(vni, inner, **kw)))  # type: ignore[arg-type]


def gre4(inner: bytes, protocol: int = fr.ETH_P_IP, ip: dict[str, object] | None = None, **kw: object) -> bytes:
    return frame_v4(47, fr.gre(protocol, inner, **kw), **(ip or {}))  # type: ignore[arg-type]


def ip_of(frame: bytes) -> bytes:
    return frame[14:]


# (name, frame, expected tunnel type or None, malformed)
CATALOGUE: list[tuple[str, bytes, int | None, bool]] = [
    ("vxlan-v4-tcp", vxlan4(INNER_TCP), rt.VXLAN, False),
    ("vxlan-vni-max", vxlan4(INNER_TCP, vni=0xFFFFFF), rt.VXLAN, False),
    ("vxlan-v6-inner-in-vlan-outer", fr.ethernet(fr.ETH_P_IP, fr.ipv4(17, fr.udp(1, fr.VXLAN_PORT,
                                                                              fr.vxlan(9, INNER_UDP6))),
                                                 vlans=[fr.vlan(300)]), rt.VXLAN, False),
    ("vxlan-inner-arp-is-not-a-tunnel", vxlan4(ARP), None, False),
    ("vxlan-no-i-flag", vxlan4(INNER_TCP, flags=0), None, True),
    ("vxlan-header-cut", frame_v4(17, fr.udp(1, fr.VXLAN_PORT, bytes(7))), None, True),
    ("vxlan-inner-ethernet-cut", frame_v4(17, fr.udp(1, fr.VXLAN_PORT, fr.vxlan(1, INNER_TCP[:13]))), None, True),
    ("vxlan-inner-ip-cut", vxlan4(INNER_TCP[:14 + 19]), None, True),
    ("vxlan-from-port-4789-only", frame_v4(17, fr.udp(fr.VXLAN_PORT, 9999, fr.vxlan(1, INNER_TCP))), None, False),
    ("geneve-v6-eth", geneve6(INNER_TCP), rt.GENEVE, False),
    ("geneve-options", geneve6(INNER_TCP, options=bytes(range(16))), rt.GENEVE, False),
    ("geneve-max-options", geneve6(INNER_UDP6, options=bytes(252)), rt.GENEVE, False),
    ("geneve-ip-direct", geneve6(ip_of(INNER_TCP), protocol=fr.ETH_P_IP), rt.GENEVE, False),
    ("geneve-ipv6-direct", geneve6(ip_of(INNER_UDP6), protocol=fr.ETH_P_IPV6), rt.GENEVE, False),
    ("geneve-version-1", geneve6(INNER_TCP, version=1), None, True),
    ("geneve-options-past-packet", frame_v6(17, fr.udp(1, fr.GENEVE_PORT, fr.geneve(1, b"", options=bytes(8))[:-4])),
     None, True),
    ("geneve-other-protocol", geneve6(INNER_TCP, protocol=0x8847), None, False),
    ("gre-v4-in-v4", gre4(ip_of(INNER_TCP)), rt.GRE, False),
    ("gre-key", gre4(ip_of(INNER_TCP), key=0xDEADBEEF), rt.GRE_KEY, False),
    ("gre-csum-key-seq", gre4(ip_of(INNER_UDP6), fr.ETH_P_IPV6, key=7, checksum=True, seq=99), rt.GRE_KEY, False),
    ("gre-csum-seq-no-key", gre4(ip_of(INNER_TCP), checksum=True, seq=1), rt.GRE, False),
    ("gre-teb", gre4(INNER_TCP, fr.ETH_P_TEB, key=5), rt.GRE_KEY, False),
    ("gre-v6-outer", frame_v6(47, fr.gre(fr.ETH_P_IPV6, ip_of(INNER_UDP6))), rt.GRE, False),
    ("gre-version-1-pptp", gre4(ip_of(INNER_TCP), version=1), None, False),
    ("gre-routing", gre4(ip_of(INNER_TCP), routing=True), None, False),
    ("gre-mpls", gre4(bytes(24), fr.ETH_P_MPLS), None, False),
    ("gre-key-cut", frame_v4(47, fr.gre(fr.ETH_P_IP, b"", key=1)[:6]), None, True),
    ("gre-inner-bad-version", gre4(b"\x65" + ip_of(INNER_TCP)[1:]), None, True),
    ("gre-first-fragment", gre4(ip_of(INNER_TCP), ip={"flags": fr.IPV4_MF}), rt.GRE, False),
    ("gre-non-first-fragment", gre4(ip_of(INNER_TCP), ip={"frag_offset": 10}), None, False),
    ("gre-in-gre-decapsulates-once", gre4(ip_of(gre4(ip_of(INNER_TCP), key=2)), key=1), rt.GRE_KEY, False),
]


def test_reference_constants_match_the_headers() -> None:
    with open(FLOW_H, encoding="ascii") as f:
        flow_h = f.read()
    with open(FLOW_H.replace("flow.h", "tunnel.h"), encoding="ascii") as f:
        tunnel_h = f.read()
    defines = dict(re.findall(r"#define\s+(XDPFLOW_\w+)\s+(\d+)", flow_h + tunnel_h))
    assert int(defines["XDPFLOW_TUNNEL_MAX_OFF"]) == rt.MAX_OFF
    assert [int(defines[f"XDPFLOW_TUNNEL_{n}"]) for n in ("NONE", "VXLAN", "GENEVE", "GRE", "GRE_KEY")] == \
        [rt.NONE, rt.VXLAN, rt.GENEVE, rt.GRE, rt.GRE_KEY]


@pytest.mark.parametrize(("frame", "type_", "malformed"), [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_reference_catalogue(frame: bytes, type_: int | None, malformed: bool) -> None:
    """The reference itself against hand-written expectations."""
    r = rt.parse(frame)
    outer = ref.parse(frame)
    assert isinstance(outer, Metered) and isinstance(r.result, Metered)
    assert r.malformed == malformed
    assert (r.tunnel.type if r.tunnel else None) == type_
    if r.tunnel is None:
        assert r.result == outer
        return
    assert r.result.octets == outer.octets
    assert r.tunnel.outer_src == outer.key.src_addr and r.tunnel.outer_ip_version == outer.key.ip_version
    assert r.result.key.dst_port in (443, 53, 0) and r.result.key != outer.key
    assert int.from_bytes(r.result.key.segment, "little") == r.tunnel.tunnel_id & 0xFFFFFF


def test_kernel_catalogue(tunnels: Harness) -> None:
    for name, frame, type_, malformed in CATALOGUE:
        r = run(tunnels, [frame])[0]
        assert (r.tunnel.type if r.tunnel else None, r.malformed) == (type_, malformed), name


def test_catalogue_in_one_batch_both_directions(tunnels: Harness) -> None:
    batch = [f for _, f, _, _ in CATALOGUE]
    run(tunnels, batch)
    run(tunnels, batch, direction=ref.EGRESS)


def test_segments_keep_inner_flows_apart(tunnels: Harness) -> None:
    """The same inner flow in two VNIs is two flows; two outer endpoints in one VNI are one (the last wins)."""
    a, b = vxlan4(INNER_TCP, vni=1), vxlan4(INNER_TCP, vni=2)
    c = frame_v4(17, fr.udp(51000, fr.VXLAN_PORT, fr.vxlan(1, INNER_TCP)), src=bytes([198, 18, 7, 7]))
    results = run(tunnels, [a, b, a, c])
    keys = {r.result.key for r in results if isinstance(r.result, Metered)}
    assert len(keys) == 2


def test_feature_off_meters_the_outer_flow(harness: Harness) -> None:
    """Without the setting the program is today's: a tunnel packet is its outer flow."""
    results = harness.run([f for _, f, _, _ in CATALOGUE])
    for (name, frame, _, _), got in zip(CATALOGUE, results, strict=True):
        assert got == ref.parse(frame), name
        assert isinstance(got, Metered) and not any(got.key.segment), name


TRUNCATION_BASES = {
    "vxlan-v4": vxlan4(INNER_TCP),
    "geneve-v6-options": geneve6(INNER_UDP6, options=bytes(8)),
    "geneve-ip-direct": geneve6(ip_of(INNER_TCP), protocol=fr.ETH_P_IP),
    "gre-csum-key-seq": gre4(ip_of(INNER_UDP6), fr.ETH_P_IPV6, key=7, checksum=True, seq=99),
    "gre-teb-v6": frame_v6(47, fr.gre(fr.ETH_P_TEB, INNER_TCP)),
}


@pytest.mark.parametrize("name", list(TRUNCATION_BASES))
def test_frame_truncated_at_every_offset(tunnels: Harness, name: str) -> None:
    base = TRUNCATION_BASES[name]
    results = run(tunnels, [base[:n] for n in range(ref.ETH_HLEN, len(base) + 1)])
    assert results[-1].tunnel is not None


def _rebuild(name: str, payload: bytes) -> bytes:
    """The base's outer headers around a (cut) tunnel payload: UDP's payload, or GRE's header and payload."""
    if name == "vxlan-v4":
        return frame_v4(17, fr.udp(51000, fr.VXLAN_PORT, payload))
    if name.startswith("geneve"):
        return frame_v6(17, fr.udp(51000, fr.GENEVE_PORT, payload))
    if name == "gre-csum-key-seq":
        return frame_v4(47, payload)
    return frame_v6(47, payload)


def _tunnel_payload(name: str) -> bytes:
    base = TRUNCATION_BASES[name]
    outer = ref.parse(base)
    assert isinstance(outer, Metered)
    return base[outer.l4 + (8 if outer.key.protocol == 17 else 0):outer.end]


@pytest.mark.parametrize("name", list(TRUNCATION_BASES))
def test_tunnel_payload_truncated_at_every_offset(tunnels: Harness, name: str) -> None:
    """The outer packet valid and complete, its tunnel payload cut at every offset: malformed (counted, the
    outer flow metered) until the inner packet is whole."""
    payload = _tunnel_payload(name)
    batch = [_rebuild(name, payload[:n]) for n in range(len(payload) + 1)]
    results = run(tunnels, batch)
    assert results[-1].tunnel is not None
    assert all(isinstance(r.result, Metered) for r in results)
    assert sum(r.malformed for r in results) >= len(payload) // 2


@st.composite
def tunnel_frame(draw: st.DrawFn) -> bytes:
    inner = draw(st.one_of(VALID, ip_frame(valid=False), mutated(ip_frame(valid=True))))
    kind = draw(st.sampled_from(["vxlan", "geneve", "gre"]))
    vni = draw(st.integers(0, 0xFFFFFF))
    if kind == "vxlan":
        payload = fr.udp(draw(st.integers(0, 65535)), fr.VXLAN_PORT,
                         fr.vxlan(vni, inner, flags=draw(st.sampled_from([0x08, 0x08, 0x00, 0xFF]))))
        proto = 17
    elif kind == "geneve":
        proto_type = draw(st.sampled_from([fr.ETH_P_TEB, fr.ETH_P_TEB, fr.ETH_P_IP, fr.ETH_P_IPV6, 0x8847]))
        body = inner if proto_type == fr.ETH_P_TEB else inner[14:]
        opts = bytes(4 * draw(st.integers(0, 63)))
        payload = fr.udp(1, fr.GENEVE_PORT, fr.geneve(vni, body, protocol=proto_type, options=opts,
                                                       version=draw(st.sampled_from([0, 0, 0, 1, 3]))))
        proto = 17
    else:
        proto_type = draw(st.sampled_from([fr.ETH_P_IP, fr.ETH_P_IPV6, fr.ETH_P_TEB]))
        body = inner if proto_type == fr.ETH_P_TEB else inner[14:]
        payload = fr.gre(proto_type, body, key=draw(st.one_of(st.none(), st.integers(0, 2**32 - 1))),
                         checksum=draw(st.booleans()), seq=draw(st.one_of(st.none(), st.integers(0, 9))),
                         version=draw(st.sampled_from([0, 0, 0, 1])))
        proto = 47
    if draw(st.booleans()):
        return frame_v4(proto, payload, vlans=draw(st.sampled_from([[], [fr.vlan(5)]])))
    return frame_v6(proto, payload)


@FUZZ
@given(batch=st.lists(st.one_of(tunnel_frame(), mutated(tunnel_frame())), min_size=1, max_size=12))
def test_fuzz_tunnel_frames(tunnels: Harness, batch: list[bytes]) -> None:
    run(tunnels, batch)


@FUZZ
@given(batch=st.lists(VALID, min_size=1, max_size=12))
def test_fuzz_plain_frames_are_unchanged_by_the_feature(tunnels: Harness, batch: list[bytes]) -> None:
    """Frames that are not tunnels meter as without the feature (the reference is the outer parser's)."""
    for r, frame in zip(run(tunnels, batch), batch, strict=True):
        if r.tunnel is None and not r.malformed:
            assert r.result == ref.parse(tunnels.view(frame))
