"""Tunnel records (templates 270-273) as tshark, nfcapd and nfacctd read them.

tshark names and decodes every tunnel field: IANA's tunnelTechnology, layer2SegmentId and greKey,
ntop's outer addresses and tunnel id, beside the inner flow's fields (from a pcap of the messages:
no network needed). nfcapd (nfdump 1.7) and nfacctd (pmacct 1.7) keep the inner flow, its counters
and times exact, and drop every tunnel field: these tests pin that down, as docs/operations.md
tells operators.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from exporter.ipfix.encoder import Encoder
from exporter.records import FLOW_RECORD, Records
from tests.interop.collecting import udp_frame, write_pcap
from tests.tunnels import tunnel_batch
from tools.external import Nfacctd, Nfcapd

pytestmark = pytest.mark.interop

NOW = 1_700_000_000.0
FIELDS = ("cflow.srcaddr", "cflow.srcaddrv6", "cflow.octets", "cflow.tunnel_technology", "cflow.layer2_segment_id",
          "cflow.gre_key", "cflow.pie.ntop.tunnel_id", "cflow.pie.ntop.untunneled_ipv4_src_addr",
          "cflow.pie.ntop.untunneled_ipv4_dst_addr", "cflow.pie.ntop.untunneled_ipv6_src_addr",
          "cflow.pie.ntop.untunneled_ipv6_dst_addr")


def test_tshark_decodes_every_tunnel_field_by_name(tmp_path: Path) -> None:
    msgs = Encoder(tunnels=True, compiled=False).encode(np.zeros(0, dtype=FLOW_RECORD), NOW, tunnelled=tunnel_batch())
    pcap = tmp_path / "tunnels.pcap"
    write_pcap(pcap, [(NOW, udp_frame(m, "127.0.0.1", "127.0.0.1", 40000)) for m in msgs])
    run = subprocess.run(["tshark", "-n", "-r", str(pcap), "-d", "udp.port==4739,cflow", "-T", "fields",
                          "-E", "separator=|", "-E", "aggregator=,", *[a for f in FIELDS for a in ("-e", f)]],
                         capture_output=True, text=True, check=True, timeout=60)
    (line,) = run.stdout.splitlines()
    got = dict(zip(FIELDS, (v.split(",") if v else [] for v in line.split("|")), strict=True))
    # Records in template order: 270 (VXLAN, v4 in v4), 271 (GRE key, v4 in v6), 272 (Geneve, v6 in
    # v4), 273 (GRE, v6 in v6).
    assert got["cflow.tunnel_technology"] == ["vxlan", "gre", "geneve", "gre"]
    assert got["cflow.layer2_segment_id"] == [str(1 << 56 | 4242), "0", "0", "0"]
    assert got["cflow.gre_key"] == ["0", "7", "0", "0"]
    assert got["cflow.pie.ntop.tunnel_id"] == ["4242", "7", "77", "0"]
    assert got["cflow.pie.ntop.untunneled_ipv4_src_addr"] == ["198.18.0.1", "198.18.1.1"]
    assert got["cflow.pie.ntop.untunneled_ipv4_dst_addr"] == ["198.18.0.2", "198.18.1.2"]
    assert got["cflow.pie.ntop.untunneled_ipv6_src_addr"] == ["fd00::1", "fd00::3"]
    assert got["cflow.pie.ntop.untunneled_ipv6_dst_addr"] == ["fd00::2", "fd00::4"]
    assert got["cflow.octets"] == ["100", "200", "300", "400"]
    assert "198.19.0.1" in got["cflow.srcaddr"] and "fd00:7::1" in got["cflow.srcaddrv6"]
    assert "malformed" not in run.stdout.lower() and "expert" not in run.stderr.lower()


def timed_batch() -> Records:
    t = tunnel_batch()
    now = int(time.time() * 1000)
    t["first_ms"], t["last_ms"], t["src_port"], t["dst_port"] = now - 3000, now - 1000, 40000, 53
    return t


def _send(port: int, tunnelled: Records) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for m in Encoder(tunnels=True).encode(np.zeros(0, dtype=FLOW_RECORD), time.time(), tunnelled=tunnelled):
            s.sendto(m, ("127.0.0.1", port))


def test_what_nfcapd_keeps_of_a_tunnel_record() -> None:
    with Nfcapd(port=49395) as col:
        _send(col.port, timed_batch())
        time.sleep(1.5)
        log = col.stop()
        flows = col.flows()
    assert "Flows: 4, Packets: 10, Bytes: 1000" in log and "Sequence Errors: 0" in log, log
    assert sorted((f.get("src4_addr") or f.get("src6_addr"), f["in_packets"], f["in_bytes"]) for f in flows) == [
        ("0.0.0.0", 2, 200), ("198.19.0.1", 1, 100), ("::", 4, 400), ("fd00:7::1", 3, 300)]
    assert not [k for f in flows for k in f if "tun" in k or "vni" in k or "gre" in k], flows


def test_what_nfacctd_keeps_of_a_tunnel_record() -> None:
    with Nfacctd(port=49396) as col:
        _send(col.port, timed_batch())
        col.stop()
        flows = col.flows()
    assert sorted((f["ip_src"], f["port_dst"], f["packets"], f["bytes"]) for f in flows) == [
        ("0.0.0.0", 53, 2, 200), ("198.19.0.1", 53, 1, 100), ("::", 53, 4, 400), ("fd00:7::1", 53, 3, 300)]
    assert not [k for f in flows for k in f if "tun" in k or "vni" in k or "gre" in k], flows
