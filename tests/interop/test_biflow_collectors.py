"""Biflow records (RFC 5103) as tshark, nfcapd and nfacctd read them.

tshark decodes every reverse element (enterprise 29305) by name. The two
Debian collectors keep less, and these tests pin down exactly what, as
docs/operations.md tells operators: nfcapd (nfdump 1.7) files the reverse
packet and octet counters as out_packets / out_bytes, but also lets the
reverse start time, interface and TCP flags land on the forward fields;
nfacctd (pmacct 1.7) keeps the forward direction only.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from exporter.biflow import BiflowTable
from exporter.ipfix import Encoder
from exporter.records import Records
from tests.interop.collecting import udp_frame, write_pcap
from tests.unit.tables import ACK, SYN, A, B, scan, uni
from tools.external import Nfacctd, Nfcapd

pytestmark = pytest.mark.interop

NOW = 1_700_000_000.0
PORT = 4739


def conversation(t0: int) -> Records:
    """One TCP conversation: 3 packets from the initiator on ifindex 2, 5 answers on ifindex 3, 7 ms later."""
    t = BiflowTable(60, 15)
    t.update(scan(uni(A, B, 40000, 80, first=t0, flags=SYN, packets=3),
                  uni(B, A, 80, 40000, first=t0 + 7, flags=SYN | ACK, packets=5, ifindex=3, ttl=61)), t0 + 7)
    return t.expire_all()


def _pairs(pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return pairs  # keeps tshark's repeated keys (forward and reverse fields share names)


def _flows(node: Any) -> list[list[tuple[str, Any]]]:
    out: list[list[tuple[str, Any]]] = []
    if isinstance(node, list) and node and all(isinstance(p, tuple) and len(p) == 2 for p in node):
        for key, value in node:
            if key.startswith("Flow ") and isinstance(value, list):
                out.append(value)
            else:
                out.extend(_flows(value))
    elif isinstance(node, list):
        for item in node:
            out.extend(_flows(item))
    return out


def test_tshark_decodes_the_reverse_elements(tmp_path: Path) -> None:
    t0 = int(NOW * 1000) - 5000
    msgs = Encoder(biflow=True).encode(conversation(t0), NOW)
    pcap = tmp_path / "biflow.pcap"
    write_pcap(pcap, [(NOW + i, udp_frame(m, "192.0.2.1", "192.0.2.2", 40000)) for i, m in enumerate(msgs)])
    cmd = ["tshark", "-n", "-r", str(pcap), "-d", f"udp.port=={PORT},cflow"]
    expert = subprocess.run([*cmd, "-z", "expert,warn", "-q"], capture_output=True, text=True, check=True).stdout
    assert "Malformed" not in expert, expert
    verbose = subprocess.run([*cmd, "-V"], capture_output=True, text=True, check=True).stdout
    for label in ("Packets: 5 (Reverse Type 2 PKTS)", "Octets: 500 (Reverse Type 1 BYTES)",
                  "InputInt: 3 (Reverse Type 10 INPUT_SNMP)", "MinTTL: 61 (Reverse Type 52",
                  "TCP Flags: 0x0012, ACK, SYN (Reverse Type 6 TCP_FLAGS)", "Biflow Direction: Initiator (1)"):
        assert label in verbose, label
    out = subprocess.run([*cmd, "-T", "json"], capture_output=True, text=True, check=True).stdout
    (flow,) = _flows(json.loads(out, object_pairs_hook=_pairs))
    values = [(k, v) for k, v in flow if isinstance(v, str)]
    assert [v for k, v in values if k == "cflow.packets"] == ["3", "5"]
    assert [v for k, v in values if k == "cflow.inputint"] == ["2", "3"]
    assert ("cflow.srcaddr", "198.18.0.1") in values and ("cflow.srcport", "40000") in values


def _send(port: int, records: Records) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for m in Encoder(biflow=True).encode(records, time.time()):
            s.sendto(m, ("127.0.0.1", port))


def test_what_nfcapd_keeps_of_a_biflow() -> None:
    t0 = int(time.time() * 1000) - 5000
    with Nfcapd(port=49391) as col:
        _send(col.port, conversation(t0))
        time.sleep(1.5)
        log = col.stop()
        (f,) = col.flows()
    assert "Flows: 1, Packets: 8, Bytes: 800" in log, log
    assert (f["src4_addr"], f["src_port"], f["in_packets"], f["in_bytes"]) == ("198.18.0.1", 40000, 3, 300)
    assert (f["out_packets"], f["out_bytes"]) == (5, 500)
    # The quirks: reverse interface and start time land on the forward fields, TCP flags are OR-ed.
    assert f["input_snmp"] == 3 and f["tcp_flags"] == "...A..S."
    assert f["first"].endswith(f".{(t0 + 7) % 1000:03d}")


def test_what_nfacctd_keeps_of_a_biflow() -> None:
    t0 = int(time.time() * 1000) - 5000
    with Nfacctd(port=49392) as col:
        _send(col.port, conversation(t0))
        col.stop()
        flows = col.flows()
    assert [(f["ip_src"], f["port_src"], f["iface_in"], f["packets"], f["bytes"]) for f in flows] == [
        ("198.18.0.1", 40000, 2, 3, 300)]
