"""`xdpflow run --tunnels` on real tunnel traffic, exported to the built-in collector.

Two namespaces joined by a veth pair (the underlay, 198.18.255.0/30) carry a VXLAN segment (VNI
4242, UDP 4789) between the kernel's own VXLAN devices, and the exporter meters the receiving
namespace's underlay interface. This kernel has no GRE or Geneve device, so those tunnels' packets
are crafted (tests/kernel/frames.py) and sent from the other namespace through a packet socket: a
keyed GRE tunnel and a Geneve segment over IPv4, and GRE over IPv6 around IPv6. With --tunnels the
streams are exported as their inner flows, beside the outer addresses, the technology and the VNI or
key; without, the same packets are the outer flows and carry no tunnel field.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import JsonCollector
from tests.kernel import frames as fr
from tools.netns import VethPair, in_netns, ip

pytestmark = pytest.mark.kernel

PORT = 4762
N = 30
VNI, GENEVE_VNI, GRE_KEY = 4242, 77, 7
GEN4, OBS4 = "198.18.255.1", "198.18.255.2"           # the underlay (VethPair's addresses)
GEN6, OBS6 = "fd00:18::1", "fd00:18::2"               # an IPv6 underlay, for the crafted frames only
VX_GEN, VX_OBS = "198.19.42.1", "198.19.42.2"          # the VXLAN overlay
PAYLOAD = 100
INNER = 20 + 8 + PAYLOAD                                # the inner IPv4/UDP packet
VXLAN_OUTER = 20 + 8 + 8 + 14 + INNER                   # outer IPv4, UDP, VXLAN, inner Ethernet

SEND = f"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", 41000))
for i in range({N}):
    s.sendto(bytes({PAYLOAD}), ("{VX_OBS}", 9999))
    time.sleep(0.002)
"""

INJECT = """
import socket, sys
frames = [bytes.fromhex(line) for line in open(sys.argv[2])]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for f in frames:
    s.send(f)
"""


def a4(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def crafted() -> dict[str, tuple[bytes, dict[str, Any]]]:
    """name -> (frame, what its inner flow's record must say)."""
    inner4 = fr.ipv4(fr.PROTO_UDP, fr.udp(42000, 7000, bytes(PAYLOAD)), src=a4("198.19.7.1"), dst=a4("198.19.7.2"))
    inner_eth = fr.ethernet(fr.ETH_P_IP, fr.ipv4(fr.PROTO_UDP, fr.udp(42001, 7001, bytes(PAYLOAD)),
                                                 src=a4("198.19.77.1"), dst=a4("198.19.77.2")))
    inner6 = fr.ipv6(fr.PROTO_UDP, fr.udp(42002, 7002, bytes(PAYLOAD)), src=a4("fd00:7::1"), dst=a4("fd00:7::2"))
    gre_key = fr.ipv4(fr.PROTO_GRE, fr.gre(fr.ETH_P_IP, inner4, key=GRE_KEY), src=a4(GEN4), dst=a4(OBS4))
    geneve = fr.ipv4(fr.PROTO_UDP, fr.udp(50000, fr.GENEVE_PORT, fr.geneve(GENEVE_VNI, inner_eth)),
                     src=a4(GEN4), dst=a4(OBS4))
    gre6 = fr.ipv6(fr.PROTO_GRE, fr.gre(fr.ETH_P_IPV6, inner6), src=a4(GEN6), dst=a4(OBS6))
    v4 = {"UNTUNNELED_IPV4_SRC_ADDR": GEN4, "UNTUNNELED_IPV4_DST_ADDR": OBS4}
    return {
        "gre_key": (fr.ethernet(fr.ETH_P_IP, gre_key), {
            "sourceIPv4Address": "198.19.7.1", "destinationTransportPort": 7000, "octetDeltaCount": N * len(gre_key),
            "tunnelTechnology": "gre", "layer2SegmentId": 0, "greKey": GRE_KEY, "UPSTREAM_TUNNEL_ID": GRE_KEY, **v4}),
        "geneve": (fr.ethernet(fr.ETH_P_IP, geneve), {
            "sourceIPv4Address": "198.19.77.1", "destinationTransportPort": 7001, "octetDeltaCount": N * len(geneve),
            "tunnelTechnology": "geneve", "layer2SegmentId": 0, "greKey": 0, "UPSTREAM_TUNNEL_ID": GENEVE_VNI, **v4}),
        "gre6": (fr.ethernet(fr.ETH_P_IPV6, gre6), {
            "sourceIPv6Address": "fd00:7::1", "destinationTransportPort": 7002, "octetDeltaCount": N * len(gre6),
            "tunnelTechnology": "gre", "layer2SegmentId": 0, "greKey": 0, "UPSTREAM_TUNNEL_ID": 0,
            "UNTUNNELED_IPV6_SRC_ADDR": GEN6, "UNTUNNELED_IPV6_DST_ADDR": OBS6}),
    }


def overlay(v: VethPair) -> None:
    """A VXLAN segment over the veth pair, an overlay address on each end."""
    for ns, ifname, local, remote, vx in ((v.gen, v.gen_if, GEN4, OBS4, VX_GEN), (v.obs, v.obs_if, OBS4, GEN4, VX_OBS)):
        ip("link", "add", "vx0", "type", "vxlan", "id", str(VNI), "dstport", "4789", "local", local,
           "remote", remote, "dev", ifname, netns=ns)
        ip("addr", "add", f"{vx}/24", "dev", "vx0", netns=ns)
        ip("link", "set", "vx0", "up", netns=ns)


def export(tmp_path: Path, xdpflow_proc: Any, *extra: str) -> tuple[list[dict[str, Any]], int]:
    """The collector's flow records, and the tunnel packets the kernel counted as decapsulated."""
    with VethPair() as v:
        overlay(v)
        col = JsonCollector(v.obs, PORT, tmp_path)
        try:
            exp = xdpflow_proc(v.obs, "run", *extra, "-i", v.obs_if, "-c", col.url, "--scan-interval", "1",
                               "--idle-timeout", "3", "--active-timeout", "30", "--max-entries", "4096",
                               "--log-level", "debug")
            exp.wait_ready(timeout=60)
            subprocess.run(in_netns(v.gen, [sys.executable, "-c", SEND]), check=True, timeout=30)
            listing = tmp_path / "frames.hex"
            listing.write_text("".join(f"{f.hex()}\n" for f, _ in crafted().values() for _ in range(N)))
            subprocess.run(in_netns(v.gen, [sys.executable, "-c", INJECT, v.gen_if, str(listing)]), check=True,
                           timeout=30)
            exp.wait_for("scan", timeout=10, count=len(exp.events("scan")) + 2)
            rc, _ = exp.stop()
            assert rc == 0
            return col.records(), sum(e.get("kernel_tunnel_decapsulated", 0) for e in exp.events("scan"))
        finally:
            col.stop()


def test_inner_flows_are_exported_with_the_outer_addresses_and_the_vni_or_key(tmp_path: Path,
                                                                              xdpflow_proc: Any) -> None:
    recs, decapsulated = export(tmp_path, xdpflow_proc, "--tunnels")
    assert decapsulated == 4 * N     # the VXLAN stream and the three crafted ones; the overlay's ARP is not IP
    vx = [r for r in recs if r.get("destinationIPv4Address") == VX_OBS and r.get("destinationTransportPort") == 9999]
    assert len(vx) == 1, recs
    assert (vx[0]["sourceIPv4Address"], vx[0]["packetDeltaCount"], vx[0]["octetDeltaCount"]) == \
        (VX_GEN, N, N * VXLAN_OUTER)
    assert (vx[0]["tunnelTechnology"], vx[0]["layer2SegmentId"], vx[0]["UPSTREAM_TUNNEL_ID"], vx[0]["greKey"]) == \
        ("vxlan", 0x01 << 56 | VNI, VNI, 0)
    assert (vx[0]["UNTUNNELED_IPV4_SRC_ADDR"], vx[0]["UNTUNNELED_IPV4_DST_ADDR"]) == (GEN4, OBS4)
    for name, (_, want) in crafted().items():
        got = [r for r in recs if r.get("destinationTransportPort") == want["destinationTransportPort"]]
        assert len(got) == 1, (name, recs)
        assert {k: got[0].get(k) for k in want} == want, name
        assert got[0]["packetDeltaCount"] == N, name
    # Nothing of the streams was metered as the outer flow.
    assert not [r for r in recs if r.get("protocolIdentifier") == 47 or
                (r.get("destinationTransportPort") in (fr.VXLAN_PORT, fr.GENEVE_PORT)
                 and r.get("packetDeltaCount", 0) >= N)]


def test_without_tunnels_the_same_packets_are_the_outer_flows(tmp_path: Path, xdpflow_proc: Any) -> None:
    recs, decapsulated = export(tmp_path, xdpflow_proc)
    assert decapsulated == 0
    assert not [r for r in recs if "tunnelTechnology" in r or r.get("sourceIPv4Address") == VX_GEN]
    vxlan = [r for r in recs if r.get("protocolIdentifier") == 17 and r.get("destinationTransportPort") == 4789]
    # The VXLAN stream (and the overlay's ARP, also in VXLAN) from source ports the kernel picked per flow.
    assert sum(r["packetDeltaCount"] for r in vxlan) >= N, recs
    assert all((r["sourceIPv4Address"], r["destinationIPv4Address"]) == (GEN4, OBS4) for r in vxlan)
    outer = {name: [r for r in recs if (r.get("sourceIPv4Address") or r.get("sourceIPv6Address")) == src
                    and r.get("destinationTransportPort") == port and r["protocolIdentifier"] == proto]
             for name, src, proto, port in (("gre_key", GEN4, 47, 0), ("geneve", GEN4, 17, fr.GENEVE_PORT),
                                            ("gre6", GEN6, 47, 0))}
    assert {k: sum(r["packetDeltaCount"] for r in v) for k, v in outer.items()} == \
        {"gre_key": N, "geneve": N, "gre6": N}, recs
