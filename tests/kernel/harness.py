"""The BPF_PROG_TEST_RUN harness of the kernel parser tests (test_parser, test_egress,
test_capture_replay): runs frames through the loaded programs, checks per frame that the counters
move as the reference predicts and per batch that the drained flows equal its aggregate.
The `harness` fixture (tests/kernel/conftest.py) gives each test module one, pinned to one CPU.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pytest

from exporter.drain import Pages
from tests.kernel import frames as fr
from tests.kernel import refparser as ref
from tests.kernel.refparser import FlowKey, Metered, Verdict
from xdp import bpfsys
from xdp.loader import Datapath

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


def show_frame(frame: bytes, limit: int = 160) -> str:
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
    last_exts: dict[str, npt.NDArray[np.void]] = field(default_factory=dict)  # extension entries, as last_slots
    drained_packets: int = 0
    drained_octets: int = 0
    dirty: bool = False
    # The reference a frame is held to (refparser.parse; the extension tests give their own), and the
    # extension's counters with what a frame must add to them (view, direction -> counter -> delta).
    reference: Callable[[bytes, int, int], ref.Result] = ref.parse
    extra_counters: tuple[str, ...] = ()
    expect_extra: Callable[[bytes, int], dict[str, int]] | None = None

    def stats(self) -> dict[str, int]:
        s = self.dp.read_stats()
        return {name: int(s[name]) for name in (*COUNTERS, *self.extra_counters)}

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
        self.last_exts = d.exts
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
            want = self.reference(self.view(frame, direction), LOOPBACK_IFINDEX, direction)
            results.append(want)
            where = f"frame {i}: {show_frame(frame)}; reference: {want}"
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
            delta = {name: after[name] - before[name] for name in after}
            before = after
            want_delta = dict.fromkeys(after, 0)
            if self.expect_extra is not None:
                want_delta.update(self.expect_extra(self.view(frame, direction), direction))
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
            f"batch: {[show_frame(f, 80) for f in batch]}")
        one_cpu = cpus is None or len(set(cpus)) == 1
        for key, agg in expected.items():
            want_value = {"packets": agg.packets, "octets": agg.octets, "tcp_flags": agg.tcp_flags, "tos": agg.tos,
                          "first_flags": agg.first_flags, "min_ttl": agg.min_ttl, "max_ttl": agg.max_ttl}
            if not one_cpu:
                want_value["tos"] = got[key]["tos"]
                want_value["first_flags"] = got[key]["first_flags"]
            assert got[key] == want_value, (
                f"flow {key}: drained {got[key]}, expected {want_value}; "
                f"frames {[show_frame(batch[i], 80) for i in agg.frames]}")
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


def loaded_harness(features: Sequence[str] = ()) -> Iterator[Harness]:
    """A loaded program (with `features`, xdp/compile.py FEATURES, compiled in) and its Harness for one
    test module, pinned to one CPU; checked and closed after."""
    if os.geteuid() != 0:
        pytest.skip("BPF_PROG_TEST_RUN needs root")
    saved = os.sched_getaffinity(0)
    dp = Datapath(max_entries=MAX_ENTRIES, features=tuple(features))
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
