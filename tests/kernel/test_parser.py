"""BPF_PROG_TEST_RUN parser tests: xdp/flow.c held equal to tests/kernel/refparser.py.

Every frame runs once through the loaded program. Per frame: the program
returns XDP_PASS, leaves the frame byte-for-byte unchanged, and moves exactly
the counters the reference predicts (one of packets / parse_failures /
non_ip, with octets and flows_created). Per batch: the page is flipped and
drained, and the drained flows (key, packets, octets, OR of TCP flags, ToS of
the first packet, min/max TTL) equal the reference's aggregate of the batch.

The process is pinned to one CPU while this module runs, so every packet of a
batch lands in the same per-CPU slot and "first packet" is well defined.

Frames longer than one page are delivered by PROG_TEST_RUN as multi-buffer
XDP: the program only sees the linear part (measured at start-up, 3520 bytes
with 4 KiB pages on x86_64). The reference is given exactly that view.

The harness runs the TC egress program (xdpflow_egress, direction 1) the same
way with `run(batch, direction=EGRESS)`: a sched_cls test run puts the whole
frame in the skb's linear part, and refuses frames over one page less the
skb's head- and tailroom (`egress_max`, measured on first use).

Fuzz example counts: XDPFLOW_FUZZ_EXAMPLES (default 150 per fuzz test).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.kernel import frames as fr
from tests.kernel import refparser as ref
from tests.kernel.catalogue import (
    CATALOGUE,
    DST,
    FAIL,
    FRAG0,
    FRAGN,
    FUZZ,
    HBH,
    MALFORMED,
    RT,
    TCP20,
    UDP8,
    VALID,
    Expect,
    IpSpec,
    check_expectation,
    frame_v4,
    frame_v6,
    ip_builder,
    ip_frame,
    one_flow,
    raw_frame,
    tally_events,
)
from tests.kernel.harness import FLOW_H, LOOPBACK_IFINDEX, Harness, show_frame
from tests.kernel.refparser import Metered
from xdp.layout import FLOW_KEY

pytestmark = pytest.mark.kernel

# -- the reference agrees with flow.h ------------------------------------------------

def test_reference_limits_match_flow_h() -> None:
    with open(FLOW_H, encoding="ascii") as f:
        text = f.read()
    defines = dict(re.findall(r"#define\s+(XDPFLOW_\w+)\s+(\d+)", text))
    assert int(defines["XDPFLOW_VLAN_MAX_DEPTH"]) == ref.VLAN_MAX_DEPTH
    assert int(defines["XDPFLOW_IPV6_MAX_EXT"]) == ref.IPV6_MAX_EXT
    assert (int(defines["XDPFLOW_INGRESS"]), int(defines["XDPFLOW_EGRESS"])) == (ref.INGRESS, ref.EGRESS)
    assert ref.KEY_SIZE == FLOW_KEY.itemsize


@pytest.mark.parametrize(("frame", "want"), [(f, w) for _, f, w in CATALOGUE], ids=[n for n, _, _ in CATALOGUE])
def test_reference_catalogue(frame: bytes, want: Expect) -> None:
    """The reference itself, against hand-written expectations (no kernel needed)."""
    check_expectation(ref.parse(frame, LOOPBACK_IFINDEX), want)


def test_kernel_catalogue(harness: Harness) -> None:
    """The whole catalogue through the program, one frame per batch so every key is checked alone."""
    for name, frame, want in CATALOGUE:
        got = harness.run([frame])
        try:
            check_expectation(got[0], want)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_catalogue_in_one_batch(harness: Harness) -> None:
    harness.run([f for _, f, _ in CATALOGUE])


@pytest.mark.parametrize("length", range(ref.ETH_HLEN))
def test_runts_are_refused_by_the_kernel(harness: Harness, length: int) -> None:
    harness.run([fr.tcp4()[:length]])


TRUNCATION_BASES = {
    "v4-tcp-options": frame_v4(6, fr.tcp(1, 2, b"data", flags=fr.TCP_ACK, options=bytes(12)), options=bytes(8),
                          vlans=[fr.vlan(9)]),
    "v4-udp-qinq-padded": fr.ethernet(fr.ETH_P_IP, fr.ipv4(17, UDP8), vlans=[fr.vlan(1, fr.ETH_P_8021AD),
                                                                           fr.vlan(2)], pad_to=64),
    "v4-icmp": frame_v4(1, fr.icmp(0, 0, bytes(20))),
    "v4-sctp": frame_v4(132, fr.sctp(3, 4, bytes(16))),
    "v6-chain-tcp": frame_v6(6, fr.tcp(10, 20, b"x"), [HBH, RT, FRAG0, DST]),
    "v6-icmpv6-vlan": frame_v6(58, fr.icmp(1, 4, bytes(8)), vlans=[fr.vlan(77)]),
    "v6-non-first-fragment": frame_v6(17, bytes(24), [DST, FRAGN]),
}


@pytest.mark.parametrize("name", list(TRUNCATION_BASES))
def test_truncated_at_every_offset(harness: Harness, name: str) -> None:
    base = TRUNCATION_BASES[name]
    assert isinstance(ref.parse(base), Metered)
    results = harness.run([base[:n] for n in range(ref.ETH_HLEN, len(base) + 1)])
    assert isinstance(results[-1], Metered)
    assert results.count(FAIL) >= 1


@pytest.mark.parametrize("depth", range(4))
@pytest.mark.parametrize("tpids", [(fr.ETH_P_8021Q,), (fr.ETH_P_8021AD, fr.ETH_P_8021Q), (fr.ETH_P_8021AD,)])
def test_vlan_stack_depths(harness: Harness, depth: int, tpids: tuple[int, ...]) -> None:
    tags = [fr.vlan(100 + i, tpids[min(i, len(tpids) - 1)]) for i in range(depth)]
    frame = frame_v4(17, UDP8, vlans=tags)
    got = harness.run([frame])[0]
    if depth <= ref.VLAN_MAX_DEPTH:
        assert isinstance(got, Metered) and got.key.vlan_id == (100 if depth else 0)
    else:
        assert got is FAIL


@pytest.mark.parametrize("length", range(9))
@pytest.mark.parametrize("kinds", ["hbh-dst-rt", "frag0", "mixed"])
def test_ipv6_extension_chain_lengths(harness: Harness, length: int, kinds: str) -> None:
    pool = {"hbh-dst-rt": [HBH, DST, RT], "frag0": [FRAG0], "mixed": [HBH, RT, FRAG0, DST,
                                                                      fr.Ext(fr.PROTO_DSTOPTS, units=30)]}[kinds]
    exts = [pool[i % len(pool)] for i in range(length)]
    got = harness.run([frame_v6(6, TCP20, exts)])[0]
    if length <= ref.IPV6_MAX_EXT:
        assert isinstance(got, Metered) and got.key.dst_port == 80
    else:
        assert got is FAIL


def test_one_flow_accumulates(harness: Harness) -> None:
    """Hit path: packets and octets add up, flags OR, ToS from the first packet, TTL min and max."""
    batch = [
        frame_v4(6, fr.tcp(1, 2, flags=fr.TCP_SYN), tos=0x10, ttl=64),
        frame_v4(6, fr.tcp(1, 2, b"abc", flags=fr.TCP_ACK), tos=0x20, ttl=3),
        frame_v4(6, fr.tcp(1, 2, bytes(1000), flags=fr.TCP_ACK | fr.TCP_PSH), ttl=200),
        frame_v4(6, fr.tcp(1, 2, flags=fr.TCP_FIN | fr.TCP_ACK), ttl=17),
        frame_v4(6, fr.tcp(1, 2, flags=fr.TCP_SYN), frag_offset=3, ttl=5),  # same addresses, ports 0: another flow
    ]
    harness.clean()
    before = harness.stats()
    harness.run(batch)
    after = harness.stats()
    assert after["flows_created"] - before["flows_created"] == 2
    assert after["octets"] - before["octets"] == 40 + 43 + 1040 + 40 + 40


def test_one_flow_on_two_cpus(harness: Harness) -> None:
    """Each CPU's slot starts from its own first packet (ToS, min TTL); the merge folds the slots."""
    if len(harness.allowed) < 2:
        pytest.skip("needs two CPUs")
    a, b = harness.allowed[:2]
    batch = [frame_v4(17, fr.udp(7, 7, bytes(n)), tos=n, ttl=100 - n) for n in range(10)]
    harness.run(batch, cpus=[a, b] * 5)
    slots = harness.last_slots
    assert slots is not None and len(slots) == 2, "one slot per CPU that saw the flow"
    assert len({k.tobytes() for k in slots["key"]}) == 1
    # CPU a metered the even frames, b the odd ones: each slot starts from its CPU's first packet.
    for first in (0, 1):
        (slot,) = slots["value"][slots["value"]["tos"] == first]
        mine = range(first, 10, 2)
        assert int(slot["packets"]) == 5
        assert int(slot["octets"]) == sum(28 + n for n in mine)
        assert (int(slot["min_ttl"]), int(slot["max_ttl"])) == (100 - mine[-1], 100 - first)
        assert 0 < int(slot["first_seen"]) <= int(slot["last_seen"])


def test_jumbo_frames_beyond_the_linear_part(harness: Harness) -> None:
    """PROG_TEST_RUN hands the program only the first `linear_max` bytes of a larger frame."""
    lin = harness.linear_max
    assert 1514 <= lin < 9000, lin

    def udp_frame(size: int) -> bytes:
        return fr.ethernet(fr.ETH_P_IP, fr.ipv4(17, fr.udp(1, size % 65536, bytes(size - 14 - 28))))

    small_ip_big_frame = fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(17, fr.udp(2, 3, bytes(100))), pad_to=9000)
    batch = [udp_frame(lin), udp_frame(lin + 1), udp_frame(9000), udp_frame(1514), small_ip_big_frame]
    results = harness.run(batch)
    assert [isinstance(r, Metered) for r in results] == [True, False, False, True, True]
    # Seen whole, the same jumbo frames parse: only the multi-buffer view makes them fail.
    assert all(isinstance(ref.parse(f), Metered) for f in batch)


@FUZZ
@given(batch=st.lists(VALID, min_size=1, max_size=12))
def test_fuzz_valid_frames(harness: Harness, batch: list[bytes]) -> None:
    results = harness.run(batch)
    tally_events(results)
    for frame, got in zip(batch, results, strict=True):
        if len(frame) <= harness.linear_max:
            assert got is not FAIL, f"generator built an invalid frame: {show_frame(frame)}"


@FUZZ
@given(batch=st.lists(MALFORMED, min_size=1, max_size=12))
def test_fuzz_malformed_frames(harness: Harness, batch: list[bytes]) -> None:
    tally_events(harness.run(batch))


@FUZZ
@given(batch=st.lists(raw_frame(), min_size=1, max_size=12))
def test_fuzz_random_bytes(harness: Harness, batch: list[bytes]) -> None:
    tally_events(harness.run(batch))


@FUZZ
@given(base=ip_frame(valid=True))
def test_fuzz_every_truncation(harness: Harness, base: bytes) -> None:
    """All cuts of one generated frame (headers only, for jumbo frames) in one batch."""
    stop = min(len(base), 200)
    cuts = [base[:n] for n in range(ref.ETH_HLEN, stop + 1)]
    harness.run([*cuts, base])


@FUZZ
@given(flows=st.lists(one_flow(), min_size=1, max_size=3), data=st.data())
def test_fuzz_flows_of_many_packets(harness: Harness, flows: list[list[bytes]], data: st.DataObject) -> None:
    """A few flows' packets interleaved in one batch: each flow's value must aggregate exactly."""
    batch = data.draw(st.permutations([f for flow in flows for f in flow]))
    results = harness.run(batch)
    assert all(isinstance(r, Metered) for r in results)
    assert len({r.key for r in results if isinstance(r, Metered)}) <= len(flows)


@FUZZ
@given(spec=ip_builder(valid=True))
def test_fuzz_header_field_sweep(harness: Harness, spec: IpSpec) -> None:
    """One drawn frame with its IP length field set to end the packet at every point from the end of the IP
    headers to 24 bytes past it (every transport header size boundary, the frame always holding the bytes);
    for IPv4 also with every IHL value."""
    batch = [spec.build(spec.headers + cut, None) for cut in range(-2, 25) if spec.headers + cut >= 0]
    if spec.version == 4:
        batch += [spec.build(None, ihl) for ihl in range(16)]
    harness.run(batch)
