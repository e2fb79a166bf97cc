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

import errno
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from exporter.drain import Pages
from tests.kernel import frames as fr
from tests.kernel import refparser as ref
from tests.kernel.refparser import FlowKey, Metered, Verdict
from xdp import bpfsys
from xdp.layout import FLOW_KEY
from xdp.loader import Datapath

pytestmark = pytest.mark.kernel

XDP_PASS = 2
TC_ACT_UNSPEC = 0xFFFFFFFF  # -1 as the test run's u32 retval: the egress program's only verdict
LOOPBACK_IFINDEX = 1  # PROG_TEST_RUN without a context: the frame arrives on lo
MAX_ENTRIES = 4096
FLOW_H = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "xdp", "flow.h")
FUZZ_EXAMPLES = int(os.environ.get("XDPFLOW_FUZZ_EXAMPLES", "150"))
COUNTERS = ("frames", "packets", "octets", "flows_created", "parse_failures", "non_ip", "insert_failures",
            "insert_failure_octets")


# -- harness ----------------------------------------------------------------------

@dataclass
class Aggregate:
    """What a flow's merged value must hold after a batch."""

    packets: int = 0
    octets: int = 0
    tcp_flags: int = 0
    tos: int = 0
    first_flags: int = 0
    min_ttl: int = 255
    max_ttl: int = 0
    frames: list[int] = field(default_factory=list)

    def add(self, m: Metered, index: int) -> None:
        if self.packets == 0:
            self.tos = m.tos
            self.first_flags = m.tcp_flags & 0xFF
        self.packets += 1
        self.octets += m.octets
        self.tcp_flags |= m.tcp_flags
        self.min_ttl = min(self.min_ttl, m.ttl)
        self.max_ttl = max(self.max_ttl, m.ttl)
        self.frames.append(index)


def _show(frame: bytes, limit: int = 160) -> str:
    tail = f"... ({len(frame)} bytes)" if len(frame) > limit else f" ({len(frame)} bytes)"
    return frame[:limit].hex() + tail


@dataclass
class Harness:
    dp: Datapath
    pages: Pages
    cpu: int = 0
    allowed: tuple[int, ...] = ()
    linear_max: int = 0
    egress_max: int = 0      # largest frame a sched_cls test run takes (0: not measured yet)
    last_slots: npt.NDArray[np.void] | None = None  # FLOW_SLOT of the last drain (one per flow and CPU)
    drained_packets: int = 0
    drained_octets: int = 0
    dirty: bool = False

    def stats(self) -> dict[str, int]:
        s = self.dp.read_stats()
        return {name: int(s[name]) for name in COUNTERS}

    def view(self, frame: bytes, direction: int = ref.INGRESS) -> bytes:
        """The bytes the program can read (data .. data_end) for this frame under PROG_TEST_RUN."""
        if direction == ref.EGRESS:
            return frame
        return frame[: self.linear_max] if self.linear_max else frame

    def program(self, direction: int = ref.INGRESS) -> tuple[int, int]:
        """(program fd, the verdict it must return) of the program metering `direction`."""
        if direction == ref.EGRESS:
            if not self.egress_max:
                self.egress_max = _probe_egress_max(self)
            return self.dp.load_egress(), TC_ACT_UNSPEC
        return self.dp.prog_fd, XDP_PASS

    def refused(self, frame: bytes, direction: int = ref.INGRESS) -> bool:
        """The kernel refuses to run a program on this frame: less than an Ethernet header; at egress
        also more than a sched_cls test run takes, or an untagged IPv4 / IPv6 ethertype followed by
        less than a minimal IP header (20 / 40 bytes; the test run reads the addresses)."""
        if len(frame) < ref.ETH_HLEN:
            return True
        if direction != ref.EGRESS:
            return False
        ethertype, l3 = int.from_bytes(frame[12:14], "big"), len(frame) - ref.ETH_HLEN
        return (len(frame) > self.egress_max or (ethertype == ref.ETH_P_IP and l3 < 20)
                or (ethertype == ref.ETH_P_IPV6 and l3 < 40))

    def drain(self) -> tuple[dict[FlowKey, dict[str, int]], list[tuple[int, int]]]:
        """Flip, drain the page just written; (merged flows by key, per-slot (first, last) monotonic ns)."""
        d = self.pages.flip_and_merge(0, keep_slots=True)
        self.dirty = False
        slots = d.slots
        assert slots is not None and d.timebase is not None
        self.last_slots = slots
        assert not slots["value"]["pad"].any(), "flow_value.pad is not zero"
        assert (slots["value"]["packets"] > 0).all(), "a slot a program took holds no packet"
        recs = d.records
        # The page's own counters cover exactly the packets in its flows (nothing is lost at this size).
        assert d.stats["packets"] == int(recs["packets"].sum()) + d.stats["insert_failures"], d.stats
        assert d.stats["octets"] == int(recs["octets"].sum()) + d.stats["insert_failure_octets"], d.stats
        assert d.stats["flows_created"] == len(slots), d.stats
        assert {FlowKey.unpack(k.tobytes()) for k in slots["key"]} == {FlowKey.from_record(r) for r in recs}
        flows: dict[FlowKey, dict[str, int]] = {}
        for rec in recs:
            key = FlowKey.from_record(rec)
            assert key not in flows, f"key drained twice: {key}"
            flows[key] = {name: int(rec[name]) for name in ("packets", "octets", "tcp_flags", "tos", "first_flags",
                                                            "min_ttl", "max_ttl")}
            self.drained_packets += int(rec["packets"])
            self.drained_octets += int(rec["octets"])
        v = slots["value"]
        times = list(zip(d.timebase.to_ns(v["first_seen"]).tolist(), d.timebase.to_ns(v["last_seen"]).tolist(),
                         strict=True))
        return flows, times

    def clean(self) -> None:
        if self.dirty:
            self.drain()
            self.drain()

    def run(self, batch: Sequence[bytes], cpus: Sequence[int] | None = None,
            direction: int = ref.INGRESS) -> list[ref.Result]:
        """Run every frame once, check it, then drain and check the flows; return the reference results.

        `cpus`: run frame i on CPU cpus[i] (default: all on the pinned CPU). Across CPUs the merged ToS
        is that of the slot with the earliest first-seen time, which the coarse clock often ties (merge
        then takes the highest): the merged ToS is not compared then; callers check the slots themselves.
        `direction`: the XDP program (INGRESS) or the TC egress program (EGRESS). A frame the kernel
        refuses to run (see `refused`) must move no counter; its reference result is still returned.
        """
        try:
            return self._run(batch, cpus, direction)
        finally:
            os.sched_setaffinity(0, {self.cpu})

    def _run(self, batch: Sequence[bytes], cpus: Sequence[int] | None, direction: int) -> list[ref.Result]:
        prog_fd, verdict = self.program(direction)
        self.clean()
        self.dirty = True
        results: list[ref.Result] = []
        expected: dict[FlowKey, Aggregate] = {}
        slots: set[tuple[FlowKey, int]] = set()   # a CPU takes a slot for a flow the first time it meters it
        t0 = time.monotonic_ns()
        before = self.stats()
        for i, frame in enumerate(batch):
            if cpus is not None:
                os.sched_setaffinity(0, {cpus[i]})
            want = ref.parse(self.view(frame, direction), LOOPBACK_IFINDEX, direction)
            results.append(want)
            where = f"frame {i}: {_show(frame)}; reference: {want}"
            if self.refused(frame, direction):
                with pytest.raises(bpfsys.BpfError) as exc:
                    bpfsys.prog_test_run(prog_fd, frame)
                assert exc.value.errno == errno.EINVAL, where
                oversized = direction == ref.EGRESS and len(frame) > self.egress_max
                assert oversized or want is Verdict.PARSE_FAILURE, where
                assert self.stats() == before, where
                continue
            r = bpfsys.prog_test_run(prog_fd, frame)
            assert r.retval == verdict, f"retval {r.retval:#x}; {where}"
            assert r.data_out == frame, f"frame modified; {where}"
            after = self.stats()
            delta = {name: after[name] - before[name] for name in COUNTERS}
            before = after
            want_delta = dict.fromkeys(COUNTERS, 0)
            want_delta["frames"] = 1
            if want is Verdict.PARSE_FAILURE:
                want_delta["parse_failures"] = 1
            elif want is Verdict.NON_IP:
                want_delta["non_ip"] = 1
            else:
                assert isinstance(want, Metered)
                want_delta["packets"] = 1
                want_delta["octets"] = want.octets
                agg = expected.setdefault(want.key, Aggregate())
                cpu = cpus[i] if cpus is not None else self.cpu
                want_delta["flows_created"] = int((want.key, cpu) not in slots)
                slots.add((want.key, cpu))
                agg.add(want, i)
            assert delta == want_delta, f"counters moved by {delta}, expected {want_delta}; {where}"
        t1 = time.monotonic_ns()

        got, times = self.drain()
        self.check_counters()
        missing = [f"{k} (frames {expected[k].frames})" for k in expected if k not in got]
        extra = [str(k) for k in got if k not in expected]
        assert not missing and not extra, (
            f"drained keys differ from the reference: missing {missing}, unexpected {extra}; "
            f"batch: {[_show(f, 80) for f in batch]}")
        one_cpu = cpus is None or len(set(cpus)) == 1
        for key, agg in expected.items():
            want_value = {"packets": agg.packets, "octets": agg.octets, "tcp_flags": agg.tcp_flags, "tos": agg.tos,
                          "first_flags": agg.first_flags, "min_ttl": agg.min_ttl, "max_ttl": agg.max_ttl}
            if not one_cpu:
                want_value["tos"] = got[key]["tos"]
                want_value["first_flags"] = got[key]["first_flags"]
            assert got[key] == want_value, (
                f"flow {key}: drained {got[key]}, expected {want_value}; "
                f"frames {[_show(batch[i], 80) for i in agg.frames]}")
        for first, last in times:
            # jiffies mapped onto CLOCK_MONOTONIC_COARSE (merge.TimeBase): tick resolution, lagging a little.
            assert t0 - 1_000_000_000 <= first <= last <= t1 + 10_000_000, (first, last, t0, t1)
        return results

    def check_counters(self) -> None:
        s = self.stats()
        assert s["frames"] == s["packets"] + s["parse_failures"] + s["non_ip"], s
        assert s["insert_failures"] == 0, s
        # Conservation: every metered packet and octet came out of a drain.
        assert s["packets"] == self.drained_packets, s
        assert s["octets"] == self.drained_octets, s


def _largest(ok: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest n in [lo, hi] with ok(n), for ok true up to some n and false beyond (bisection)."""
    assert ok(lo)
    if ok(hi):
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _probe_linear_max(h: Harness) -> int:
    """Largest frame whose bytes the program sees whole under PROG_TEST_RUN (the rest goes to frags)."""

    def whole(n: int) -> bool:
        frame = fr.ethernet(fr.ETH_P_IP, fr.ipv4(fr.PROTO_UDP, fr.udp(9, 9, bytes(n - 14 - 28))))
        before = h.stats()["packets"]
        h.dirty = True
        try:
            bpfsys.prog_test_run(h.dp.prog_fd, frame)
        except bpfsys.BpfError:
            return False
        return h.stats()["packets"] > before

    largest = _largest(whole, 128, 14 + 65535)  # whole(hi + 1) cannot be asked
    h.clean()
    return largest


def _probe_egress_max(h: Harness) -> int:
    """Largest frame a sched_cls test run accepts (the skb's head must fit one page with its tailroom)."""

    def runs(n: int) -> bool:
        h.dirty = True
        frame = fr.ethernet(fr.ETH_P_IP, fr.ipv4(fr.PROTO_UDP, fr.udp(9, 9, bytes(n - 14 - 28))))
        try:
            bpfsys.prog_test_run(h.dp.load_egress(), frame)
        except bpfsys.BpfError as e:
            assert e.errno == errno.EINVAL, e
            return False
        return True

    largest = _largest(runs, 128, 65535)
    h.clean()
    return largest


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    if os.geteuid() != 0:
        pytest.skip("BPF_PROG_TEST_RUN needs root")
    saved = os.sched_getaffinity(0)
    dp = Datapath(max_entries=MAX_ENTRIES)
    try:
        os.sched_setaffinity(0, {min(saved)})
        dp.load()
        h = Harness(dp, Pages(dp), cpu=min(saved), allowed=tuple(sorted(saved)))
        h.linear_max = _probe_linear_max(h)
        yield h
        h.clean()
        h.check_counters()
    finally:
        dp.close()
        os.sched_setaffinity(0, saved)


# -- the reference agrees with flow.h ------------------------------------------------

def test_reference_limits_match_flow_h() -> None:
    with open(FLOW_H, encoding="ascii") as f:
        text = f.read()
    defines = dict(re.findall(r"#define\s+(XDPFLOW_\w+)\s+(\d+)", text))
    assert int(defines["XDPFLOW_VLAN_MAX_DEPTH"]) == ref.VLAN_MAX_DEPTH
    assert int(defines["XDPFLOW_IPV6_MAX_EXT"]) == ref.IPV6_MAX_EXT
    assert (int(defines["XDPFLOW_INGRESS"]), int(defines["XDPFLOW_EGRESS"])) == (ref.INGRESS, ref.EGRESS)
    assert ref.KEY_SIZE == FLOW_KEY.itemsize


# -- a hand-checked catalogue ----------------------------------------------------------

M4 = b"\x00" * 10 + b"\xff\xff"
Expect = Verdict | dict[str, int]
FAIL = Verdict.PARSE_FAILURE
NON_IP = Verdict.NON_IP


def _v4(proto: int, l4: bytes = b"", vlans: Sequence[tuple[int, int]] = (), **ip: object) -> bytes:
    return fr.ethernet(fr.ETH_P_IP, fr.ipv4(proto, l4, **ip), vlans=vlans)  # type: ignore[arg-type]


def _v6(proto: int, l4: bytes = b"", exts: Sequence[fr.Ext] = (), vlans: Sequence[tuple[int, int]] = (),
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
    ("v4-tcp-syn", _v4(6, TCP20), {"ip_version": 4, "protocol": 6, "src_port": 1234, "dst_port": 80,
                                   "octets": 40, "tcp_flags": fr.TCP_SYN, "ttl": 64, "vlan_id": 0}),
    ("v4-tcp-all-9-flags-doff15", _v4(6, fr.tcp(1, 2, b"x", flags=0x1FF, options=bytes(40))),
     {"tcp_flags": 0x1FF, "octets": 20 + 60 + 1}),
    ("v4-tcp-reserved-bits-ignored", _v4(6, fr.tcp(1, 2, flags=0xE00 | fr.TCP_FIN)), {"tcp_flags": fr.TCP_FIN}),
    ("v4-udp", _v4(17, fr.udp(40000, 4739, b"hello")), {"protocol": 17, "src_port": 40000, "dst_port": 4739,
                                                        "octets": 33, "tcp_flags": 0}),
    ("v4-sctp", _v4(132, fr.sctp(2905, 2906)), {"protocol": 132, "src_port": 2905, "dst_port": 2906}),
    ("v4-icmp-echo", _v4(1, fr.icmp(8, 0)), {"protocol": 1, "src_port": 0, "dst_port": 0x0800}),
    ("v4-icmp-unreach", _v4(1, fr.icmp(3, 1, b"")), {"protocol": 1, "src_port": 0, "dst_port": 0x0301}),
    ("v4-carrying-icmpv6-no-ports", _v4(58, fr.icmp(128, 0)), {"protocol": 58, "dst_port": 0}),
    ("v4-gre", _v4(47, fr.gre(payload=b"\x45" + bytes(19))), {"protocol": 47, "src_port": 0, "dst_port": 0}),
    ("v4-esp", _v4(50, bytes(16)), {"protocol": 50, "dst_port": 0}),
    ("v4-proto-255-empty", _v4(255), {"protocol": 255, "octets": 20}),
    ("v4-tos-ttl", _v4(17, UDP8, tos=0xB9, ttl=1), {"tos": 0xB9, "ttl": 1}),
    ("v4-options-ihl15", _v4(17, UDP8, options=bytes([1] * 40)), {"dst_port": 53, "octets": 68}),
    ("v4-options-ihl6", _v4(6, TCP20, options=b"\x94\x04\x00\x00"), {"dst_port": 80, "octets": 44}),
    ("v4-ethernet-padding", fr.ethernet(fr.ETH_P_IP, fr.ipv4(17, UDP8), pad_to=60), {"octets": 28}),
    ("v4-trailing-garbage", _v4(17, UDP8) + b"\xff" * 100, {"octets": 28, "dst_port": 53}),
    ("v4-addresses-mapped", _v4(17, UDP8, src=bytes([10, 1, 2, 3]), dst=bytes([255, 255, 255, 255])),
     {"src_addr": int.from_bytes(M4 + bytes([10, 1, 2, 3])), "dst_addr": int.from_bytes(M4 + b"\xff" * 4)}),
    ("v4-first-fragment", _v4(6, TCP20 + bytes(100), flags=fr.IPV4_MF), {"src_port": 1234, "dst_port": 80}),
    ("v4-df-set", _v4(6, TCP20, flags=fr.IPV4_DF), {"dst_port": 80}),
    ("v4-non-first-fragment", _v4(6, TCP20, frag_offset=185), {"protocol": 6, "src_port": 0, "dst_port": 0,
                                                                "tcp_flags": 0, "octets": 40}),
    ("v4-last-fragment-empty", _v4(17, frag_offset=1), {"protocol": 17, "dst_port": 0, "octets": 20}),
    ("v4-max-fragment-offset", _v4(17, b"abc", frag_offset=0x1FFF, flags=fr.IPV4_MF), {"dst_port": 0}),
    ("v4-tiny-first-fragment", _v4(6, TCP20[:8], flags=fr.IPV4_MF), FAIL),
    ("v4-tcp-19-bytes", _v4(6, TCP20[:19]), FAIL),
    ("v4-udp-7-bytes", _v4(17, UDP8[:7]), FAIL),
    ("v4-sctp-11-bytes", _v4(132, fr.sctp(1, 2)[:11]), FAIL),
    ("v4-icmp-3-bytes", _v4(1, fr.icmp(8, 0)[:3]), FAIL),
    ("v4-icmp-4-bytes", _v4(1, fr.icmp(8, 0)[:4]), {"dst_port": 0x0800, "octets": 24}),
    ("v4-udp-cut-by-total-length", _v4(17, UDP8, total_length=27), FAIL),
    ("v4-total-length-past-frame", _v4(17, UDP8, total_length=29), FAIL),
    ("v4-total-length-below-header", _v4(255, total_length=19), FAIL),
    ("v4-total-length-below-options", _v4(255, bytes(8), options=bytes(8), total_length=24), FAIL),
    ("v4-total-length-0", _v4(17, UDP8, total_length=0), FAIL),
    ("v4-ihl-0", _v4(17, UDP8, ihl=0), FAIL),
    ("v4-ihl-4", _v4(17, UDP8, ihl=4), FAIL),
    ("v4-ihl-past-frame", _v4(255, ihl=15, total_length=20), FAIL),
    ("v4-ihl-6-shifts-ports", _v4(17, UDP8 + b"\x00\x07\x00\x08", ihl=6), {"src_port": 8, "dst_port": 0,
                                                                             "octets": 32}),
    ("v4-version-6", _v4(17, UDP8, version=6), FAIL),
    ("v4-header-19-bytes", fr.ethernet(fr.ETH_P_IP, fr.ipv4(17, UDP8)[:19]), FAIL),
    ("eth-only-ip", fr.ethernet(fr.ETH_P_IP), FAIL),
    ("eth-only-ipv6", fr.ethernet(fr.ETH_P_IPV6), FAIL),
    ("eth-only-arp", fr.ethernet(fr.ETH_P_ARP), NON_IP),
    ("arp", fr.ethernet(fr.ETH_P_ARP, fr.arp_request(), pad_to=60), NON_IP),
    ("lldp", fr.ethernet(fr.ETH_P_LLDP, bytes(40)), NON_IP),
    ("mpls", fr.ethernet(fr.ETH_P_MPLS, bytes(4) + fr.ipv4(17, UDP8)), NON_IP),
    ("802.3-length-field", fr.ethernet(46, bytes(46)), NON_IP),
    ("vlan1", _v4(17, UDP8, vlans=[fr.vlan(100)]), {"vlan_id": 100, "dst_port": 53}),
    ("vlan1-pcp-dei-vid4095", _v4(17, UDP8, vlans=[fr.vlan(4095, pcp=7, dei=1)]), {"vlan_id": 4095}),
    ("vlan1-vid0-priority-tag", _v6(17, UDP8, vlans=[fr.vlan(0, pcp=5)]), {"vlan_id": 0, "ip_version": 6}),
    ("qinq-88a8", _v4(17, UDP8, vlans=[fr.vlan(200, fr.ETH_P_8021AD), fr.vlan(300)]), {"vlan_id": 200}),
    ("qinq-8100-8100", _v6(6, TCP20, vlans=[fr.vlan(7), fr.vlan(8)]), {"vlan_id": 7, "dst_port": 80}),
    ("qinq-88a8-88a8", _v4(17, UDP8, vlans=[fr.vlan(1, fr.ETH_P_8021AD), fr.vlan(2, fr.ETH_P_8021AD)]),
     {"vlan_id": 1}),
    ("vlan-depth-3", _v4(17, UDP8, vlans=[fr.vlan(1), fr.vlan(2), fr.vlan(3)]), FAIL),
    ("vlan-depth-3-arp", fr.ethernet(fr.ETH_P_ARP, fr.arp_request(), vlans=[fr.vlan(1)] * 3), FAIL),
    ("vlan-arp", fr.ethernet(fr.ETH_P_ARP, fr.arp_request(), vlans=[fr.vlan(10)]), NON_IP),
    ("vlan-tag-truncated", fr.ethernet(fr.ETH_P_8021Q)[:14] + b"\x00\x64\x08", FAIL),
    ("vlan-then-nothing", fr.ethernet(fr.ETH_P_IP, vlans=[fr.vlan(5)]), FAIL),
    ("v6-udp", _v6(17, UDP8), {"ip_version": 6, "protocol": 17, "src_port": 5353, "dst_port": 53, "octets": 48,
                               "src_addr": int.from_bytes(fr.SRC6), "dst_addr": int.from_bytes(fr.DST6)}),
    ("v6-tcp", _v6(6, fr.tcp(5, 6, flags=fr.TCP_ACK | fr.TCP_PSH)), {"tcp_flags": 0x18}),
    ("v6-sctp", _v6(132, fr.sctp(7, 8)), {"src_port": 7, "dst_port": 8}),
    ("v6-icmpv6-echo", _v6(58, fr.icmp(128, 0)), {"protocol": 58, "dst_port": 0x8000}),
    ("v6-carrying-icmp-no-ports", _v6(1, fr.icmp(8, 0)), {"protocol": 1, "dst_port": 0}),
    ("v6-no-next-header", _v6(59), {"protocol": 59, "octets": 40}),
    ("v6-tclass-flowlabel-hoplimit", _v6(17, UDP8, traffic_class=0xB9, flow_label=0xFFFFF, hop_limit=255),
     {"tos": 0xB9, "ttl": 255}),
    ("v6-padding", fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(17, UDP8) + bytes(30)), {"octets": 48}),
    ("v6-payload-length-past-frame", _v6(17, UDP8, payload_length=9), FAIL),
    ("v6-payload-length-cuts-udp", _v6(17, UDP8, payload_length=7), FAIL),
    ("v6-payload-length-0-udp", _v6(17, UDP8, payload_length=0), FAIL),
    ("v6-version-4", _v6(17, UDP8, version=4), FAIL),
    ("v6-header-39-bytes", fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(59)[:39]), FAIL),
    ("v6-hbh-udp", _v6(17, UDP8, [HBH]), {"protocol": 17, "dst_port": 53, "octets": 56}),
    ("v6-routing-tcp", _v6(6, TCP20, [RT]), {"protocol": 6, "dst_port": 80}),
    ("v6-dstopts-icmpv6", _v6(58, fr.icmp(135, 0), [DST]), {"protocol": 58, "dst_port": 135 << 8}),
    ("v6-5-exts", _v6(17, UDP8, CHAIN6[:5]), {"dst_port": 53}),
    ("v6-6-exts", _v6(17, UDP8, CHAIN6), {"dst_port": 53}),
    ("v6-7-exts", _v6(17, UDP8, [*CHAIN6, HBH]), FAIL),
    ("v6-8-exts", _v6(17, UDP8, [*CHAIN6, DST, DST]), FAIL),
    ("v6-6-exts-then-no-next", _v6(59, b"", CHAIN6), {"protocol": 59}),
    ("v6-first-fragment", _v6(17, UDP8 + bytes(64), [FRAG0]), {"protocol": 17, "dst_port": 53}),
    ("v6-non-first-fragment", _v6(6, TCP20, [FRAGN]), {"protocol": 6, "src_port": 0, "dst_port": 0,
                                                       "tcp_flags": 0, "octets": 68}),
    ("v6-non-first-fragment-of-icmpv6", _v6(58, b"", [HBH, FRAGN]), {"protocol": 58, "dst_port": 0}),
    ("v6-non-first-fragment-6th", _v6(17, b"", [*CHAIN6[:5], FRAGN]), {"protocol": 17, "dst_port": 0}),
    ("v6-non-first-fragment-7th", _v6(17, b"", [*CHAIN6, FRAGN]), FAIL),
    ("v6-non-first-fragment-then-ext", _v6(17, b"", [FRAGN, HBH]), {"protocol": 0, "dst_port": 0}),
    ("v6-fragment-header-cut", fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(44, bytes([17]) + bytes(6))), FAIL),
    ("v6-ext-past-packet", fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(60, bytes([59, 1]) + bytes(10))), FAIL),
    ("v6-ext-len-byte-missing", fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(0, bytes([59])) + bytes(20)), FAIL),
    ("v6-ext-exactly-fills-packet", fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(0, bytes([59, 0]) + bytes(6))),
     {"protocol": 59, "octets": 48}),
    ("v6-ext-then-udp-missing", fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(0, bytes([17, 0]) + bytes(6))), FAIL),
    ("v6-ext-past-packet-within-frame",
     fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(0, bytes([59, 1]) + bytes(6), payload_length=8) + bytes(40)), FAIL),
    ("v6-ah-not-skipped", _v6(51, bytes(24)), {"protocol": 51, "dst_port": 0}),
    ("v6-in-vlan", _v6(17, UDP8, [HBH], vlans=[fr.vlan(42)]), {"vlan_id": 42}),
]


def _check_expectation(got: ref.Result, want: Expect) -> None:
    if isinstance(want, Verdict):
        assert got is want
        return
    assert isinstance(got, Metered), got
    fields = {"octets": got.octets, "tcp_flags": got.tcp_flags, "tos": got.tos, "ttl": got.ttl,
              "src_port": got.key.src_port, "dst_port": got.key.dst_port, "protocol": got.key.protocol,
              "ip_version": got.key.ip_version, "vlan_id": got.key.vlan_id, "ifindex": got.key.ifindex,
              "src_addr": int.from_bytes(got.key.src_addr), "dst_addr": int.from_bytes(got.key.dst_addr)}
    assert {k: fields[k] for k in want} == want


@pytest.mark.parametrize(("frame", "want"), [(f, w) for _, f, w in CATALOGUE], ids=[n for n, _, _ in CATALOGUE])
def test_reference_catalogue(frame: bytes, want: Expect) -> None:
    """The reference itself, against hand-written expectations (no kernel needed)."""
    _check_expectation(ref.parse(frame, LOOPBACK_IFINDEX), want)


def test_kernel_catalogue(harness: Harness) -> None:
    """The whole catalogue through the program, one frame per batch so every key is checked alone."""
    for name, frame, want in CATALOGUE:
        got = harness.run([frame])
        try:
            _check_expectation(got[0], want)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_catalogue_in_one_batch(harness: Harness) -> None:
    harness.run([f for _, f, _ in CATALOGUE])


@pytest.mark.parametrize("length", range(ref.ETH_HLEN))
def test_runts_are_refused_by_the_kernel(harness: Harness, length: int) -> None:
    harness.run([fr.tcp4()[:length]])


TRUNCATION_BASES = {
    "v4-tcp-options": _v4(6, fr.tcp(1, 2, b"data", flags=fr.TCP_ACK, options=bytes(12)), options=bytes(8),
                          vlans=[fr.vlan(9)]),
    "v4-udp-qinq-padded": fr.ethernet(fr.ETH_P_IP, fr.ipv4(17, UDP8), vlans=[fr.vlan(1, fr.ETH_P_8021AD),
                                                                           fr.vlan(2)], pad_to=64),
    "v4-icmp": _v4(1, fr.icmp(0, 0, bytes(20))),
    "v4-sctp": _v4(132, fr.sctp(3, 4, bytes(16))),
    "v6-chain-tcp": _v6(6, fr.tcp(10, 20, b"x"), [HBH, RT, FRAG0, DST]),
    "v6-icmpv6-vlan": _v6(58, fr.icmp(1, 4, bytes(8)), vlans=[fr.vlan(77)]),
    "v6-non-first-fragment": _v6(17, bytes(24), [DST, FRAGN]),
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
    frame = _v4(17, UDP8, vlans=tags)
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
    got = harness.run([_v6(6, TCP20, exts)])[0]
    if length <= ref.IPV6_MAX_EXT:
        assert isinstance(got, Metered) and got.key.dst_port == 80
    else:
        assert got is FAIL


def test_one_flow_accumulates(harness: Harness) -> None:
    """Hit path: packets and octets add up, flags OR, ToS from the first packet, TTL min and max."""
    batch = [
        _v4(6, fr.tcp(1, 2, flags=fr.TCP_SYN), tos=0x10, ttl=64),
        _v4(6, fr.tcp(1, 2, b"abc", flags=fr.TCP_ACK), tos=0x20, ttl=3),
        _v4(6, fr.tcp(1, 2, bytes(1000), flags=fr.TCP_ACK | fr.TCP_PSH), ttl=200),
        _v4(6, fr.tcp(1, 2, flags=fr.TCP_FIN | fr.TCP_ACK), ttl=17),
        _v4(6, fr.tcp(1, 2, flags=fr.TCP_SYN), frag_offset=3, ttl=5),  # same addresses, ports 0: another flow
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
    batch = [_v4(17, fr.udp(7, 7, bytes(n)), tos=n, ttl=100 - n) for n in range(10)]
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
def _events(results: Sequence[ref.Result]) -> None:
    """Outcome mix, shown by --hypothesis-show-statistics."""
    for r in results:
        event(r.name if isinstance(r, Verdict) else f"metered v{r.key.ip_version}")


FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


@FUZZ
@given(batch=st.lists(VALID, min_size=1, max_size=12))
def test_fuzz_valid_frames(harness: Harness, batch: list[bytes]) -> None:
    results = harness.run(batch)
    _events(results)
    for frame, got in zip(batch, results, strict=True):
        if len(frame) <= harness.linear_max:
            assert got is not FAIL, f"generator built an invalid frame: {_show(frame)}"


@FUZZ
@given(batch=st.lists(MALFORMED, min_size=1, max_size=12))
def test_fuzz_malformed_frames(harness: Harness, batch: list[bytes]) -> None:
    _events(harness.run(batch))


@FUZZ
@given(batch=st.lists(raw_frame(), min_size=1, max_size=12))
def test_fuzz_random_bytes(harness: Harness, batch: list[bytes]) -> None:
    _events(harness.run(batch))


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
