"""`xdpflow run --egress` on a gateway: each forwarded packet once per direction, at the collector.

A router namespace forwards a UDP stream from a to b and sends pings of its own. With XDP and TC
egress on both router interfaces, the stream is one ingress record on the a-side interface and one
egress record on the b-side interface with the same packets; the router's own pings are egress only,
their replies ingress only. With --biflow as well, each interface's view pairs what left it with
what came in (per-interface pairing).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import JsonCollector
from tests.kernel.prometheus import METRICS_PORT, scrape, value
from tools.netns import PING_B4, Router, ifindex, in_netns

pytestmark = pytest.mark.kernel

PORT = 4761
N = 40
SEND = f"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{Router.A4}", 40500))
for i in range({N}):
    s.sendto(bytes(100), ("{Router.B4}", 9999))
    time.sleep(0.002)
"""


def run_gateway(tmp_path: Path, xdpflow_proc: Any, *extra: str) -> tuple[list[dict[str, Any]], dict[str, int], float]:
    with Router() as r:
        col = JsonCollector(r.router, PORT, tmp_path)
        try:
            exp = xdpflow_proc(r.router, "run", "--egress", *extra, "-i", r.ra_if, "-i", r.rb_if, "-c", col.url,
                               "--scan-interval", "1", "--idle-timeout", "3", "--active-timeout", "30",
                               "--max-entries", "4096", "--log-level", "debug", "--metrics", str(METRICS_PORT))
            started = exp.wait_ready(timeout=60)
            assert started["egress"] == {r.ra_if: "tcx", r.rb_if: "tcx"}
            subprocess.run(in_netns(r.a, [sys.executable, "-c", SEND]), check=True, timeout=30)
            # The router pings b itself: host-originated, seen leaving rb only.
            subprocess.run(in_netns(r.router, [sys.executable, "-c", PING_B4]), check=True, capture_output=True,
                           timeout=30)
            exp.wait_for("scan", timeout=10, count=len(exp.events("scan")) + 2)
            samples = scrape(r.router)
            egress_up = sum(value(samples, "xdpflow_egress_attached", interface=i, method="tcx")
                            for i in (r.ra_if, r.rb_if))
            rc, _ = exp.stop()
            assert rc == 0
            names = {"ra": ifindex(r.router, r.ra_if), "rb": ifindex(r.router, r.rb_if)}
            return col.records(), names, egress_up
        finally:
            col.stop()


def test_a_forwarded_packet_is_counted_once_per_direction(tmp_path: Path, xdpflow_proc: Any) -> None:
    recs, idx, egress_up = run_gateway(tmp_path, xdpflow_proc)
    assert egress_up == 2
    udp = [x for x in recs if x.get("protocolIdentifier") == 17 and x.get("destinationTransportPort") == 9999]
    by_dir = {(x["flowDirection"], x["ingressInterface"], x["egressInterface"]): x for x in udp}
    assert sorted(by_dir) == [(0, idx["ra"], 0), (1, 0, idx["rb"])], udp
    for x in udp:
        assert (x["packetDeltaCount"], x["octetDeltaCount"]) == (N, N * 128)
        assert (x["sourceIPv4Address"], x["sourceTransportPort"]) == (Router.A4, 40500)

    icmp = [x for x in recs if x.get("protocolIdentifier") == 1]
    requests = [x for x in icmp if x["icmpTypeCodeIPv4"] == 0x0800]
    replies = [x for x in icmp if x["icmpTypeCodeIPv4"] == 0]
    assert [(x["sourceIPv4Address"], x["flowDirection"], x["egressInterface"], x["packetDeltaCount"])
            for x in requests] == [(Router.RB4, 1, idx["rb"], 3)], "the router's own pings: egress only"
    assert [(x["sourceIPv4Address"], x["flowDirection"], x["ingressInterface"], x["packetDeltaCount"])
            for x in replies] == [(Router.B4, 0, idx["rb"], 3)], "their replies: ingress only"


def test_biflow_with_egress_pairs_each_interface_view(tmp_path: Path, xdpflow_proc: Any) -> None:
    recs, idx, _ = run_gateway(tmp_path, xdpflow_proc, "--biflow")
    # (b answers the UDP stream with port unreachables: other ICMP records, not looked at here.)
    icmp = [x for x in recs if x.get("protocolIdentifier") == 1 and x["icmpTypeCodeIPv4"] in (0x0800, 0)]
    # On rb the router's requests left and b's replies came in: one conversation, the router initiating.
    assert len(icmp) == 1, [{k: v for k, v in x.items() if not k.startswith("_")} for x in icmp]
    (ping,) = icmp
    assert (ping["sourceIPv4Address"], ping["destinationIPv4Address"]) == (Router.RB4, Router.B4)
    assert (ping["flowDirection"], ping["egressInterface"], ping["reverseIngressInterface"]) == (1, idx["rb"],
                                                                                                 idx["rb"])
    assert (ping["packetDeltaCount"], ping["reversePacketDeltaCount"], ping["biflowDirection"]) == (3, 3, 1)
    udp = [x for x in recs if x.get("protocolIdentifier") == 17 and x.get("destinationTransportPort") == 9999]
    # One-way traffic: two views (in on ra, out on rb), neither with a reverse side, so both go
    # with the uniflow templates (no reverse fields, no reverse times of 0).
    assert sorted((x["flowDirection"], x["packetDeltaCount"]) for x in udp) == [(0, N), (1, N)]
    assert not any(k.startswith("reverse") for x in udp for k in x), udp
