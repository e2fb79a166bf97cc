"""Sampling: `--sampling N` meters each packet with probability 1/N in the kernel.

The sampled count of a large run is Binomial(total, 1/N): it must lie within 5 standard deviations
of total/N (a false alarm once in ~3.5 million runs). Accounting stays exact: every frame is either
metered (`packets`) or `sampled_out`, and the drained flows hold exactly the metered packets.
Random, not count-based: 1000 flows each sent 200 times in a row get per-flow counts spread as a
binomial (variance ~ n p (1-p)); a 1-in-N counter would give every flow exactly 200/N. End to end,
four flows sent round robin with N = 4 are each sampled about a quarter of the time (a counter
would meter one flow and never the others), and options records carry samplingInterval = N.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from exporter.drain import Pages
from tests.conftest import JsonCollector
from tools import trafgen
from tools.netns import VethPair
from tools.packets import TCP, UDP, Flow
from xdp import bpfsys, filters
from xdp.loader import Datapath

pytestmark = pytest.mark.kernel

COLLECTOR_PORT = 4739   # the test collector, in the observer namespace

BOUND_SD = 5.0
FRAME = Flow("t", "198.18.0.1", "198.19.0.1", TCP, 40000, 443, tcp_flags=0x10, payload_len=0).frame()
OCTETS = len(FRAME) - 14


@pytest.fixture(scope="module")
def dp() -> Iterator[Datapath]:
    if os.geteuid() != 0:
        pytest.skip("BPF_PROG_TEST_RUN needs root")
    d = Datapath(max_entries=1 << 14).load()
    try:
        yield d
    finally:
        d.close()


def z_score(k: int, total: int, n: int) -> float:
    p = 1 / n
    return (k - total * p) / math.sqrt(total * p * (1 - p))


@pytest.mark.parametrize("n", [2, 10, 100, 1000])
def test_sampled_share_is_within_the_bound(dp: Datapath, n: int) -> None:
    total = 2_000_000
    dp.configure(None, n)
    try:
        before = dp.read_stats()
        bpfsys.prog_test_run(dp.prog_fd, FRAME, repeat=total)
        after = dp.read_stats()
    finally:
        dp.configure(None, 1)
    d = {k: after[k] - before[k] for k in after}
    assert d["frames"] == total == d["packets"] + d["sampled_out"]
    assert d["octets"] == d["packets"] * OCTETS and d["sampled_out_octets"] == d["sampled_out"] * OCTETS
    z = z_score(d["packets"], total, n)
    assert abs(z) < BOUND_SD, f"1 in {n}: {d['packets']} of {total} metered, z = {z:.2f}"


def test_per_flow_counts_are_binomial_and_exact(dp: Datapath) -> None:
    flows, runs, n = 1000, 200, 10
    pages = Pages(dp)
    pages.flip_and_merge(0)
    pages.flip_and_merge(0)
    dp.configure(None, n)
    try:
        for i in range(flows):
            frame = Flow("f", "198.18.0.1", "198.19.0.1", TCP, 1000 + i, 443, tcp_flags=0x10, payload_len=0).frame()
            bpfsys.prog_test_run(dp.prog_fd, frame, repeat=runs)
    finally:
        dp.configure(None, 1)
    d = pages.flip_and_merge(0)
    recs = d.records
    assert d.stats["frames"] == flows * runs == d.stats["packets"] + d.stats["sampled_out"]
    assert int(recs["packets"].sum()) == d.stats["packets"] and d.stats["insert_failures"] == 0
    per_flow = np.zeros(flows)
    np.add.at(per_flow, recs["src_port"].astype(np.int64) - 1000, recs["packets"])
    z = z_score(int(per_flow.sum()), flows * runs, n)
    assert abs(z) < BOUND_SD, z
    p = 1 / n
    want_var = runs * p * (1 - p)            # 18 for 200 runs at 1 in 10
    assert 0.6 * want_var < per_flow.var() < 1.4 * want_var, (per_flow.var(), want_var)


def test_filters_apply_before_sampling(dp: Datapath) -> None:
    total = 400_000
    excluded = Flow("x", "198.18.0.1", "10.0.0.1", TCP, 40000, 443, tcp_flags=0x10, payload_len=0).frame()
    dp.configure(filters.compile_rules(filters.parse_rules(["exclude dst 10.0.0.0/8"])), 4)
    try:
        before = dp.read_stats()
        bpfsys.prog_test_run(dp.prog_fd, excluded, repeat=total)
        bpfsys.prog_test_run(dp.prog_fd, FRAME, repeat=total)
        after = dp.read_stats()
        rules = {c.rule: c.packets for c in dp.rule_counters()}
    finally:
        dp.configure(None, 1)
    d = {k: after[k] - before[k] for k in after}
    assert d["filtered"] == total, "excluded packets are filtered, never sampled"
    assert d["packets"] + d["sampled_out"] == total
    assert abs(z_score(d["packets"], total, 4)) < BOUND_SD
    assert rules["exclude dst 10.0.0.0/8"] >= total


# -- end to end ---------------------------------------------------------------------------------------

def test_round_robin_flows_are_each_sampled(veth: VethPair, xdpflow_proc: Any, collector: JsonCollector) -> None:
    n, per_flow = 4, 4000
    flows = [Flow(f"rr{i}", f"198.18.3.{i + 1}", "198.19.3.1", UDP, 7000 + i, 9, payload_len=18, count=per_flow)
             for i in range(4)]
    p = xdpflow_proc(veth.obs, "run", "--interface", veth.obs_if, "--collector", f"127.0.0.1:{COLLECTOR_PORT}",
                     "--scan-interval", "0.25", "--idle-timeout", "30", "--active-timeout", "60",
                     "--max-entries", "4096", "--sampling", str(n), "--log-level", "debug")
    assert p.wait_ready()["sampling"] == n
    trafgen.send(veth.gen, veth.gen_if, [fl.frame() for fl in flows], per_flow * len(flows), gap_us=10)
    p.wait_for("scan", count=len(p.events("scan")) + 3)
    rc, _ = p.stop()
    assert rc == 0
    stopped = p.events("stopped")[0]
    total = per_flow * len(flows)
    assert stopped["observed_packets"] + stopped["sampled_out_packets"] == total
    assert stopped["ignored_packets"] == 0
    collector.wait_for("every metered packet", lambda: sum(r["packetDeltaCount"] for r in collector.flows())
                       == stopped["observed_packets"])
    for fl in flows:
        got = collector.packets_of(fl)
        z = z_score(got, per_flow, n)
        assert abs(z) < BOUND_SD, f"{fl.name}: {got} of {per_flow} sampled at 1 in {n}, z = {z:.2f}"
    options = [r for r in collector.all_records() if r["_options"] and "samplingInterval" in r]
    assert options and all(r["samplingInterval"] == n and r["samplingPacketInterval"] == n for r in options)
