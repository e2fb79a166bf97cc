"""Overload: concurrent flows at 2x and 10x max_entries. A page runs out of slots; nothing is lost silently.

For every packet trafgen sent, either an exported record holds it or the exporter reported it
as ignored (options records, metrics, logs): exported + ignored == observed == sent, exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Any

import pytest

from tests.conftest import ROOT, xdpflow_cmd
from tools.bench import flow_grid, trafgen_profile
from tools.netns import VethPair, in_netns

MAX_ENTRIES = 2048
PAYLOAD = 18
OCTETS = 20 + 8 + PAYLOAD  # IPv4 + UDP + payload


def send_profile(veth: VethPair, flows: int, rounds: int) -> int:
    a, b = flow_grid(flows)
    total = a * b * rounds
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as f:
        f.write(trafgen_profile(flows, payload=PAYLOAD))
    try:
        subprocess.run(in_netns(veth.gen, ["trafgen", "--dev", veth.gen_if, "--conf", f.name, "--cpus", "1",
                                           "--num", str(total), "--rate", "60000pps", "--no-sock-mem",
                                           "--no-cpu-stats", "--notouch-irq"]),
                       check=True, capture_output=True, timeout=300)
    finally:
        os.unlink(f.name)
    return total


@pytest.mark.kernel
@pytest.mark.parametrize("factor", [2, 10])
def test_overload_is_accounted_exactly(veth: VethPair, xdpflow_proc: Any, factor: int) -> None:
    collector = subprocess.Popen(in_netns(veth.obs, xdpflow_cmd("collect", "--listen", "127.0.0.1:4739", "--json",
                                                                "--log-format", "json")),
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        p = xdpflow_proc(veth.obs, "run", "--interface", veth.obs_if, "--max-entries", str(MAX_ENTRIES),
                         "--scan-interval", "0.5", "--log-level", "debug")
        p.wait_ready()
        sent = send_profile(veth, factor * MAX_ENTRIES, rounds=3)
        p.wait_for("scan", count=len(p.events("scan")) + 2)
        rc, _ = p.stop()
        assert rc == 0
        collector.terminate()
        out, _ = collector.communicate(timeout=30)
    finally:
        if collector.poll() is None:
            collector.kill()
            collector.wait()

    assert veth.rx_dropped() == 0, "packets dropped before XDP: the test's rate is too high"
    stopped = p.events("stopped")[0]
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    data = [r for r in records if "packetDeltaCount" in r and not r.get("_options")]
    exported_packets = sum(r["packetDeltaCount"] for r in data)
    exported_octets = sum(r["octetDeltaCount"] for r in data)

    assert stopped["observed_packets"] == sent
    assert stopped["observed_octets"] == sent * OCTETS
    assert stopped["ignored_packets"] > 0, "a table this small must have run out of slots"
    assert exported_packets + stopped["ignored_packets"] == sent
    assert exported_octets + stopped["ignored_octets"] == sent * OCTETS
    for scan in p.events("scan"):
        assert scan["ignored_packets"] >= 0
        assert scan["active"] <= 2 * MAX_ENTRIES, "the user-space table outgrew its bound"

    warnings = p.events("kernel flow table too small: flows found no free slot")
    assert len(warnings) == 1, "the capacity warning must be rate-limited to once a minute"
    assert warnings[0]["suggested_max_entries"] >= factor * MAX_ENTRIES

    options = [r for r in records if r.get("_options") and "ignoredPacketTotalCount" in r]
    assert options, "no metering-statistics options record reached the collector"
    last = max(options, key=lambda r: r["packetTotalCount"])
    assert last["packetTotalCount"] == sent
    assert last["ignoredPacketTotalCount"] == stopped["ignored_packets"]
