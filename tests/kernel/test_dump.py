"""xdpflow dump on a real veth pair: exact packets and octets per flow, native and generic mode."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from tests.conftest import xdp_attached
from tools import trafgen
from tools.netns import VethPair
from tools.packets import Flow, standard_mix


def flow_key(rec: dict[str, Any]) -> tuple[str, str, int, int, int, int]:
    fam = "IPv4" if "sourceIPv4Address" in rec else "IPv6"
    src = str(ipaddress.ip_address(rec[f"source{fam}Address"]))
    dst = str(ipaddress.ip_address(rec[f"destination{fam}Address"]))
    return (src, dst, rec["protocolIdentifier"], rec["sourceTransportPort"], rec["destinationTransportPort"],
            rec["vlanId"])


def parse_dump(out: str) -> tuple[dict[tuple[str, str, int, int, int, int], dict[str, Any]], dict[str, int]]:
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert "counters" in lines[-1], lines[-1]
    flows: dict[tuple[str, str, int, int, int, int], dict[str, Any]] = {}
    for rec in lines[:-1]:
        k = flow_key(rec)
        assert k not in flows, f"flow reported twice: {k}"
        flows[k] = rec
    return flows, lines[-1]["counters"]


def assert_exact(flows: dict[Any, dict[str, Any]], counters: dict[str, int], sent: list[Flow], ifindex: int) -> None:
    for fl in sent:
        rec = flows.get(fl.key)
        assert rec is not None, f"flow {fl.name} {fl.key} missing from dump: {list(flows)}"
        assert rec["packetDeltaCount"] == fl.count, (fl.name, rec)
        assert rec["octetDeltaCount"] == fl.count * fl.octets_per_packet, (fl.name, rec)
        assert rec["ingressInterface"] == ifindex
        assert rec["tcpControlBits"] == fl.tcp_flags
        assert rec["flowStartMilliseconds"] <= rec["flowEndMilliseconds"]
    assert set(flows) == {fl.key for fl in sent}, "unexpected flows metered"
    assert counters["packets"] == sum(fl.count for fl in sent)
    assert counters["octets"] == sum(fl.count * fl.octets_per_packet for fl in sent)
    assert counters["parse_failures"] == 0
    assert counters["insert_failures"] == 0
    assert counters["frames"] == counters["packets"] + counters["non_ip"] + counters["parse_failures"]


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["native", "generic"])
def test_dump_counts_exactly(veth: VethPair, xdpflow_proc: Any, mode: str) -> None:
    p = xdpflow_proc(veth.obs, "dump", "--interface", veth.obs_if, "--mode", mode, "--json",
                     "--max-entries", "4096")
    started = p.wait_for("metering")
    assert started["interfaces"] == {veth.obs_if: mode}
    assert xdp_attached(veth.obs, veth.obs_if)
    sent = standard_mix()
    trafgen.send_flows(veth.gen, veth.gen_if, sent)
    rc, out = p.stop()
    assert rc == 0
    assert not xdp_attached(veth.obs, veth.obs_if), "dump left its XDP program attached"
    assert veth.rx_dropped() == 0
    flows, counters = parse_dump(out)
    assert_exact(flows, counters, sent, veth.obs_ifindex())


@pytest.mark.kernel
def test_flips_during_traffic_lose_nothing(veth: VethPair, xdpflow_proc: Any) -> None:
    """Pages flipped every 20 ms while traffic runs: the folded drains still equal what was sent."""
    p = xdpflow_proc(veth.obs, "dump", "--interface", veth.obs_if, "--mode", "native", "--json",
                     "--max-entries", "4096", "--scan-interval", "0.02")
    p.wait_for("metering")
    sent = standard_mix(scale=10)
    trafgen.send_flows(veth.gen, veth.gen_if, sent, gap_us=50)
    rc, out = p.stop()
    assert rc == 0
    flows, counters = parse_dump(out)
    done = p.events("done")
    assert done and done[0]["drains"] >= 10, "pages were not flipped while traffic ran"
    assert_exact(flows, counters, sent, veth.obs_ifindex())
