"""End to end: trafgen -> XDP (native and generic) -> xdpflow run -> nfcapd, exact totals; tshark clean."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.conftest import xdp_attached
from tests.interop.collecting import nf_key
from tools import trafgen
from tools.external import Nfcapd, Tshark
from tools.netns import VethPair
from tools.packets import standard_mix

PORT = 9995


@pytest.mark.kernel
@pytest.mark.interop
@pytest.mark.parametrize("mode", ["native", "generic"])
def test_export_to_nfcapd_is_exact(veth: VethPair, xdpflow_proc: Any, mode: str) -> None:
    with Nfcapd(PORT, netns=veth.obs) as nf, Tshark(PORT, netns=veth.obs) as cap:
        p = xdpflow_proc(veth.obs, "run", "--interface", veth.obs_if, "--mode", mode,
                         "--collector", f"127.0.0.1:{PORT}", "--scan-interval", "0.5", "--idle-timeout", "30",
                         "--active-timeout", "60", "--max-entries", "4096", "--log-level", "debug")
        started = p.wait_ready()
        assert started["interfaces"] == {veth.obs_if: mode}
        sent = standard_mix()
        t_start = time.time()
        trafgen.send_flows(veth.gen, veth.gen_if, sent)
        t_end = time.time()
        p.wait_for("scan", count=3)
        rc, _ = p.stop()
        assert rc == 0, p.logs
        assert not xdp_attached(veth.obs, veth.obs_if)
        stopped = p.events("stopped")[0]
        assert stopped["records_exported"] == len(sent)
        assert stopped["observed_packets"] == sum(fl.count for fl in sent)
        assert stopped["ignored_packets"] == 0
        scans = p.events("scan")
        assert all(s["ignored_packets"] == 0 and s["ignored_octets"] == 0 for s in scans), scans
        assert sum(s["observed_packets"] for s in scans) == sum(fl.count for fl in sent)
        assert sum(s["observed_octets"] for s in scans) == sum(fl.count * fl.octets_per_packet for fl in sent)
        cap.stop()
        nf.stop()
        flows = nf.flows()
        packets, warnings = cap.decode()
        expert = cap.expert_warnings()

    by_key: dict[tuple[str, str, int, int, int, int], dict[str, Any]] = {}
    for r in flows:
        k = nf_key(r)
        assert k not in by_key, f"nfdump shows {k} twice"
        by_key[k] = r
    assert set(by_key) == {fl.key for fl in sent}, (sorted(by_key), flows[:2])
    for fl in sent:
        r = by_key[fl.key]
        assert int(r["in_packets"]) == fl.count, (fl.name, r)
        assert int(r["in_bytes"]) == fl.count * fl.octets_per_packet, (fl.name, r)
        for field in ("first", "last"):
            t = datetime.fromisoformat(r[field]).replace(tzinfo=UTC).timestamp()
            assert t_start - 0.5 <= t <= t_end + 0.5, (field, r[field], t_start, t_end)
    assert sum(int(r["in_packets"]) for r in flows) == sum(fl.count for fl in sent)

    assert packets, "tshark captured nothing"
    assert "Malformed" not in warnings and "Malformed" not in expert, expert
    for pkt in packets:
        layers = pkt["_source"]["layers"]
        assert "cflow" in layers, f"tshark did not decode a datagram as IPFIX: {list(layers)}"
