"""End to end into pmacct's nfacctd: the standard mix arrives with exact counters and keys.

pmacct keeps ICMP type/code in the destination port (type << 8 | code) as we send it; it
shows tcp_flags as 0 for IPFIX tcpControlBits (a pmacct limitation, not asserted here).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest

from tools import trafgen
from tools.external import Nfacctd
from tools.netns import VethPair
from tools.packets import standard_mix

PORT = 2100


def key(r: dict[str, Any]) -> tuple[str, str, int, int, int]:
    return (r["ip_src"], r["ip_dst"], int(r["port_src"]), int(r["port_dst"]), int(r["vlan"]))


@pytest.mark.kernel
@pytest.mark.interop
def test_export_to_nfacctd(veth: VethPair, xdpflow_proc: Any) -> None:
    sent = standard_mix()
    with Nfacctd(PORT, netns=veth.obs) as nf:
        p = xdpflow_proc(veth.obs, "run", "--interface", veth.obs_if, "--collector", f"127.0.0.1:{PORT}",
                         "--scan-interval", "0.5", "--max-entries", "4096")
        p.wait_ready()
        t_start = time.time()
        trafgen.send_flows(veth.gen, veth.gen_if, sent)
        t_end = time.time()
        rc, _ = p.stop()
        assert rc == 0
        log = nf.stop()
        flows = nf.flows()
    assert "malformed" not in log.lower(), log[-2000:]
    got = {key(r): r for r in flows}
    assert len(got) == len(flows) == len(sent), flows
    ifindex = veth.obs_ifindex()
    for fl in sent:
        src, dst, _proto, sport, dport, vlan = fl.key
        r = got[(src, dst, sport, dport, vlan)]
        assert int(r["packets"]) == fl.count, (fl.name, r)
        assert int(r["bytes"]) == fl.count * fl.octets_per_packet, (fl.name, r)
        assert int(r["iface_in"]) == ifindex
        assert int(r["tos"]) == fl.tos
        for field in ("timestamp_start", "timestamp_end"):
            t = datetime.fromisoformat(r[field]).replace(tzinfo=UTC).timestamp()
            assert t_start - 0.5 <= t <= t_end + 0.5, (field, r[field])
