"""`xdpflow run --biflow` on a gateway: a real TCP connection and a ping through a router namespace.

XDP meters ingress only, so the router sees a's packets enter its a-side interface and b's answers
enter its b-side interface; biflow pairs them across the two interfaces into one record per
conversation, the initiator (a) first. Checked at the built-in collector, by element name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import JsonCollector
from tests.kernel.prometheus import METRICS_PORT, scrape, value
from tools.netns import PING_B4, Router, ifindex, in_netns

pytestmark = pytest.mark.kernel

PORT = 4760
SERVER_PORT = 8080

SERVER = f"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{Router.B4}", {SERVER_PORT})); s.listen(1); print("ready", flush=True)
c, _ = s.accept()
while data := c.recv(65536):
    c.sendall(data)
c.close()
"""

CLIENT = f"""
import socket
c = socket.create_connection(("{Router.B4}", {SERVER_PORT}), timeout=10)
print(c.getsockname()[1], flush=True)
for _ in range(5):
    c.sendall(b"x" * 1000)
    got = 0
    while got < 1000:
        got += len(c.recv(65536))
c.shutdown(socket.SHUT_WR)
c.recv(1)
c.close()
"""




def _conversation(recs: list[dict[str, Any]], a: tuple[str, int], b: tuple[str, int]) -> list[dict[str, Any]]:
    def ends(r: dict[str, Any]) -> set[tuple[str, int]]:
        return {(r.get("sourceIPv4Address"), r.get("sourceTransportPort")),
                (r.get("destinationIPv4Address"), r.get("destinationTransportPort"))}
    return [r for r in recs if ends(r) == {a, b}]


def test_a_connection_through_the_gateway_is_one_biflow(tmp_path: Path, xdpflow_proc: Any) -> None:
    with Router() as r:
        col = JsonCollector(r.router, PORT, tmp_path)
        server: subprocess.Popen[str] | None = None
        try:
            exp = xdpflow_proc(r.router, "run", "--biflow", "-i", r.ra_if, "-i", r.rb_if, "-c", col.url,
                               "--scan-interval", "1", "--idle-timeout", "3", "--active-timeout", "30",
                               "--max-entries", "4096", "--log-level", "debug", "--metrics", str(METRICS_PORT))
            exp.wait_ready(timeout=60)
            server = subprocess.Popen(in_netns(r.b, [sys.executable, "-c", SERVER]), stdout=subprocess.PIPE,
                                      text=True)
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            client = subprocess.run(in_netns(r.a, [sys.executable, "-c", CLIENT]), capture_output=True, text=True,
                                    timeout=30, check=True)
            sport = int(client.stdout.strip())
            server.wait(timeout=10)
            subprocess.run(in_netns(r.a, [sys.executable, "-c", PING_B4]), check=True, capture_output=True,
                           timeout=30)
            exp.wait_for("scan", timeout=10, count=len(exp.events("scan")) + 2)
            reverse_sides = value(scrape(r.router), "xdpflow_biflow_reverse_uniflows_total")
            rc, _ = exp.stop()
            assert rc == 0
            ra, rb = ifindex(r.router, r.ra_if), ifindex(r.router, r.rb_if)
            recs = col.records()
        finally:
            if server is not None and server.poll() is None:
                server.kill()
            col.stop()

    tcp = _conversation(recs, (Router.A4, sport), (Router.B4, SERVER_PORT))
    assert tcp, recs
    first = next(x for x in tcp if x["tcpControlBits"] & 0x02)
    assert (first["sourceIPv4Address"], first["sourceTransportPort"]) == (Router.A4, sport)
    shown = json.dumps([{k: v for k, v in x.items() if not k.startswith("_")} for x in tcp])
    assert first["biflowDirection"] == 1, f"the bare SYN names the initiator: {shown}"
    assert (first["ingressInterface"], first["reverseIngressInterface"]) == (ra, rb)
    assert first["reverseTcpControlBits"] & 0x12 == 0x12, "the answer carries SYN+ACK"
    from_a = sum(x["packetDeltaCount"] if x["sourceIPv4Address"] == Router.A4 else x["reversePacketDeltaCount"]
                 for x in tcp)
    from_b = sum(x["reversePacketDeltaCount"] if x["sourceIPv4Address"] == Router.A4 else x["packetDeltaCount"]
                 for x in tcp)
    assert from_a >= 8 and from_b >= 7, tcp  # handshake, 5 writes each way, the FINs
    assert reverse_sides >= 2, "the TCP answers and the echo replies were folded in as reverse sides"

    pings = [x for x in recs if x.get("protocolIdentifier") == 1]
    assert len(pings) == 1, pings
    (ping,) = pings
    assert (ping["sourceIPv4Address"], ping["destinationIPv4Address"]) == (Router.A4, Router.B4)
    assert ping["icmpTypeCodeIPv4"] == 0x0800 and ping["biflowDirection"] == 1
    assert (ping["packetDeltaCount"], ping["reversePacketDeltaCount"]) == (3, 3)
    assert (ping["octetDeltaCount"], ping["reverseOctetDeltaCount"]) == (3 * 84, 3 * 84)
