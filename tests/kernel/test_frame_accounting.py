"""Every frame accounted for on the wire (issue 13): the RFC 5476 selector reports and RFC 7011 4.2.

A known mix of frames goes from the generator namespace through the veth into `xdpflow run`: ARP
(not IP), malformed IPv4 and IPv6 headers (the parser gives up: counted, passed on, never metered),
and valid IPv4/IPv6 flows, once plainly and once with a filter rule and 1-in-2 sampling in force.
At the built-in collector, from the last options records of the run (sent after the final drain):

- selectorIdTotalPktsObserved = the observer's rx_packets over the run (a quiet interface: IPv6
  is off on both ends and nothing else sends), and
- packets in the flow records + ignoredPacketTotalCount = the last selectorIdTotalPktsSelected,
  with each selector's count exactly what it must have removed (ARP, the excluded protocol), the
  malformed packets in ignoredPacketTotalCount and their octets in ignoredOctetTotalCount;
- the ignored packets' time window lies within the run, and interfaceName names the observer's veth.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import JsonCollector
from tests.kernel import frames as fr
from tools.netns import VethPair, inside, link_counters

pytestmark = pytest.mark.kernel

SRC4, DST4 = bytes([198, 18, 7, 1]), bytes([198, 18, 7, 2])
SRC6, DST6 = bytes.fromhex("fd00000000000000000000000000a001"), bytes.fromhex("fd00000000000000000000000000a002")
ROUNDS = 40


def mix() -> dict[str, list[bytes]]:
    """The frames of one round, by kind."""
    def eth(ethertype: int, payload: bytes) -> bytes:
        return fr.ethernet(ethertype, payload, pad_to=fr.ETH_MIN_FRAME)

    return {
        "arp": [eth(fr.ETH_P_ARP, fr.arp_request(SRC4, bytes([198, 18, 7, 200 + i]))) for i in range(3)],
        # The parser gives up before reading a total length: a failure's octets are the frame's from the
        # network header on (46 in these 60-byte frames).
        "malformed": [
            eth(fr.ETH_P_IP, fr.ipv4(fr.PROTO_UDP, fr.udp(1, 2), src=SRC4, dst=DST4, ihl=4)),
            eth(fr.ETH_P_IP, fr.ipv4(fr.PROTO_UDP, fr.udp(1, 2), src=SRC4, dst=DST4, total_length=900)),
            eth(fr.ETH_P_IPV6, fr.ipv6(fr.PROTO_UDP, fr.udp(3, 4), src=SRC6, dst=DST6, payload_length=400)[:46]),
        ],
        "udp4": [eth(fr.ETH_P_IP, fr.ipv4(fr.PROTO_UDP, fr.udp(5000 + i, 53, b"q" * 10), src=SRC4, dst=DST4))
                 for i in range(4)],
        "tcp6": [eth(fr.ETH_P_IPV6, fr.ipv6(fr.PROTO_TCP, fr.tcp(40000 + i, 443, flags=fr.TCP_ACK), src=SRC6,
                                            dst=DST6)) for i in range(2)],
    }


def send(veth: VethPair, frames: list[bytes]) -> None:
    """Raw frames out of the generator's veth (AF_PACKET: the stack adds nothing, resolves nothing)."""
    with inside(veth.gen):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        try:
            s.bind((veth.gen_if, 0))
            for f in frames:
                s.send(f)
        finally:
            s.close()


def rx_packets(veth: VethPair) -> int:
    return link_counters(veth.obs, veth.obs_if, ["rx_packets"])["rx_packets"]


def last(records: list[dict[str, Any]], template: int) -> dict[str, Any]:
    mine = [r for r in records if r["_options"] and r["_template_id"] == template]
    assert mine, f"no options record of template {template}"
    return mine[-1]


def run_mix(veth: VethPair, xdpflow_proc: Any, tmp_path: Path, *extra: str) -> tuple[dict[str, Any], ...]:
    collector = JsonCollector(veth.obs, 4739, tmp_path)
    try:
        before = rx_packets(veth)
        t0 = time.time() * 1000
        p = xdpflow_proc(veth.obs, "run", "--interface", veth.obs_if, "--collector", collector.url,
                         "--scan-interval", "0.5", "--idle-timeout", "30", "--active-timeout", "60",
                         "--log-level", "debug", *extra)
        p.wait_ready()
        kinds = mix()
        for _ in range(ROUNDS):
            send(veth, [f for group in kinds.values() for f in group])
        p.wait_for("scan", count=len(p.events("scan")) + 2)
        rc, _ = p.stop()
        assert rc == 0
        after = rx_packets(veth)
        t1 = time.time() * 1000
        collector.wait_for("the final options", lambda: any(
            r["_options"] and r["_template_id"] == 268 and r["selectorIdTotalPktsObserved"] == after - before
            for r in collector.all_records()))
        records = collector.all_records()
    finally:
        collector.kill()
    flows = [r for r in records if not r["_options"]]
    run = {"rx": after - before, "t0": t0, "t1": t1, "kinds": {k: len(v) * ROUNDS for k, v in kinds.items()},
           "packets": sum(r["packetDeltaCount"] for r in flows),
           "octets": sum(r["octetDeltaCount"] for r in flows), "flows": flows}
    return run, last(records, 268), last(records, 260), records


def test_every_frame_is_accounted_for(veth: VethPair, xdpflow_proc: Any, tmp_path: Path) -> None:
    run, stats, metering, records = run_mix(veth, xdpflow_proc, tmp_path)
    kinds = run["kinds"]
    assert run["rx"] == sum(kinds.values()), "the interface was not quiet"
    observed = stats["selectorIdTotalPktsObserved"]
    selected = [stats["selectorIdTotalPktsSelected"], stats["selectorIdTotalPktsSelected#2"],
                stats["selectorIdTotalPktsSelected#3"]]
    assert observed == run["rx"]
    assert selected == [observed - kinds["arp"]] * 3, "no filter, no sampling: only ARP is not selected"
    assert metering["ignoredPacketTotalCount"] == kinds["malformed"]
    assert metering["ignoredOctetTotalCount"] == kinds["malformed"] * (fr.ETH_MIN_FRAME - 14)
    assert run["packets"] + metering["ignoredPacketTotalCount"] == selected[-1]
    assert run["packets"] == kinds["udp4"] + kinds["tcp6"]
    assert metering["packetTotalCount"] == run["packets"]
    first, latest = metering["observationTimeMilliseconds"], metering["observationTimeMilliseconds#2"]
    assert run["t0"] - 1000 <= first <= latest <= run["t1"] + 1000, "the ignored packets' window is the run's"
    names = [r for r in records if r["_options"] and r["_template_id"] == 264]
    assert {(r["ingressInterface"], r["interfaceName"]) for r in names} == {(veth.obs_ifindex(), veth.obs_if)}
    sequence = last(records, 265)
    assert [sequence[k] for k in ("selectorId", "selectorId#2", "selectorId#3")] == [1, 2, 3]


def test_filters_and_sampling_are_accounted_for(veth: VethPair, xdpflow_proc: Any, tmp_path: Path) -> None:
    run, stats, metering, records = run_mix(veth, xdpflow_proc, tmp_path, "--filter", "exclude proto tcp",
                                            "--sampling", "2")
    kinds = run["kinds"]
    observed = stats["selectorIdTotalPktsObserved"]
    ip, kept, sampled = (stats["selectorIdTotalPktsSelected"], stats["selectorIdTotalPktsSelected#2"],
                         stats["selectorIdTotalPktsSelected#3"])
    assert observed == run["rx"] == sum(kinds.values())
    assert ip == observed - kinds["arp"]
    assert kept == ip - kinds["tcp6"], "the rule excludes exactly the TCP packets"
    # 1 in 2 at random over the UDP packets (the malformed ones are not judged: they stay selected).
    udp = kinds["udp4"]
    assert kinds["malformed"] + udp // 4 < sampled < kinds["malformed"] + udp * 3 // 4
    assert run["packets"] + metering["ignoredPacketTotalCount"] == sampled
    assert metering["ignoredPacketTotalCount"] == kinds["malformed"]
    assert all(r["protocolIdentifier"] == 17 for r in run["flows"])
    sampler = last(records, 267)
    assert (sampler["selectorId"], sampler["selectorAlgorithm"]) == (3, 4)
    assert abs(sampler["samplingProbability"] - 0.5) < 1e-9
    assert last(records, 258)["samplingInterval"] == 2
