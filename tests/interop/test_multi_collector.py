"""One exporter, three collectors at once: nfcapd (UDP), the built-in collector (UDP) and IPFIX over TCP.

Every collector runs on the observer namespace's loopback. The built-in collector speaks UDP only
(collectors/server.py), so the TCP side is `TcpCollector` (tests/interop/collecting.py): an
asyncio server that cuts the stream into IPFIX messages by the header's length field (RFC 7011
section 10.4) and feeds each to
collectors.decoder.Decoder, one transport session per connection. Both in-process collectors run
on `NetnsLoop`, an event loop on a thread that has entered the observer namespace (setns(2) is
per thread), so the test reads their state directly instead of parsing a subprocess' output.

The exporter runs with `--sequence-mode nfdump` so that nfcapd, which does not count options
records in sequence numbers, sees no sequence failures either; the in-process collectors are told
the same (count_options=False). tshark checks sequence numbers the RFC way, so on this dialect it
flags every message that follows one with options records ("Unexpected flow sequence"); that is
the only warning allowed, and the options records must decode (samplingInterval, flowKeyIndicator).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from exporter.ipfix import CONFIG_TEMPLATE_ID, FLOW_KEYS_TEMPLATE_ID, METERING_TEMPLATE_ID, RELIABILITY_TEMPLATE_ID
from tests.interop.collecting import (
    NFCAPD_PORT,
    TCP_PORT,
    UDP_PORT,
    NetnsLoop,
    expected_totals,
    flow_records,
    flow_sets,
    nfcapd_sequence_errors,
    nfcapd_totals,
    options_records,
    send_batches,
    tcp_collector,
    totals,
    udp_collector,
)
from tools.external import Nfcapd, Tshark
from tools.netns import VethPair
from tools.packets import standard_mix

# -- the test --------------------------------------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.interop
def test_three_collectors_each_get_everything_in_sequence(veth: VethPair, xdpflow_proc: Any) -> None:
    batches = [standard_mix(), standard_mix()]
    want = expected_totals(batches)
    n_flows = sum(len(b) for b in batches)
    n_packets = sum(fl.count for b in batches for fl in b)

    with NetnsLoop(veth.obs) as loop, Nfcapd(NFCAPD_PORT, netns=veth.obs) as nf, \
            Tshark(UDP_PORT, netns=veth.obs) as cap, udp_collector(loop, UDP_PORT, count_options=False) as udp, \
            tcp_collector(loop, TCP_PORT, count_options=False) as tcp:
        p = xdpflow_proc(veth.obs, "run", "--interface", veth.obs_if, "--sequence-mode", "nfdump",
                         "--collector", f"udp://127.0.0.1:{NFCAPD_PORT}", "--collector", f"udp://127.0.0.1:{UDP_PORT}",
                         "--collector", f"tcp://127.0.0.1:{TCP_PORT}", "--scan-interval", "0.5",
                         "--idle-timeout", "1", "--active-timeout", "60", "--max-entries", "4096",
                         "--log-level", "debug")
        started = p.wait_ready()
        assert len(started["collectors"]) == 3, started
        # Two batches, the first exported (idle timeout) before the second is sent: data in several
        # messages per collector, so each collector's numbering is checked across data messages.
        send_batches(veth, p, batches)
        rc, _ = p.stop()
        assert rc == 0, p.logs
        assert loop.run(tcp.wait_flows(n_flows, timeout=10)), len(flow_records(tcp.records))
        assert loop.run(udp.wait_until(lambda c: len(flow_records(c.records)) >= n_flows, timeout=10))
        loop.run(tcp.stop())
        cap.stop()
        nf_log = nf.stop()
        nf_flows = nf.flows()
        nf_stat = nf.stat_text()
        packets, tshark_stderr = cap.decode()
        expert = cap.expert_warnings()
        udp_records = list(udp.records)
        udp_stats = udp.counters()

    stopped = p.events("stopped")[0]
    assert stopped["records_exported"] == n_flows
    assert stopped["observed_packets"] == n_packets and stopped["ignored_packets"] == 0
    sent = stopped["sent"]
    assert set(sent) == {f"udp://127.0.0.1:{NFCAPD_PORT}", f"udp://127.0.0.1:{UDP_PORT}",
                         f"tcp://127.0.0.1:{TCP_PORT}"}
    for name, st in sent.items():
        assert st["records"] == n_flows and st["not_sent_flows"] == 0 and st["send_errors"] == 0, (name, st)

    # nfcapd: every flow, exact counters, no sequence failures in its dialect.
    assert len(nf_flows) == n_flows
    assert nfcapd_totals(nf_flows) == want
    assert nfcapd_sequence_errors(nf_log, nf_stat) == (0, 0), nf_log

    # built-in collector over UDP: every flow, exact, no gap, nothing undecodable.
    assert len(flow_records(udp_records)) == n_flows
    assert totals(udp_records) == want
    assert udp_stats["gaps"] == 0 and udp_stats["malformed"] == 0, udp_stats
    assert udp_stats["unknown_template_sets"] == 0 and udp_stats.get("socket_drops", 0) == 0, udp_stats

    # TCP: one connection, templates first, every flow, exact, no gap, no partial message.
    assert tcp.connections == 1 and tcp.first_has_templates == [True], tcp.first_has_templates
    assert tcp.leftover == [0] and not tcp.malformed and tcp.unknown_sets == 0, (tcp.leftover, tcp.malformed)
    assert len(flow_records(tcp.records)) == n_flows
    assert totals(tcp.records) == want
    assert tcp.gaps == [], tcp.gaps

    # Each collector numbers its own stream: a header's sequence number is the flow records sent
    # to that collector before it (nfdump dialect), so the last message's number plus its records
    # is what that collector received in all.
    for name, records in (("udp", udp_records), ("tcp", tcp.records)):
        last_seq = max(r.sequence for r in records)
        in_last = sum(1 for r in flow_records(records) if r.sequence == last_seq)
        assert last_seq + in_last == n_flows, (name, last_seq, in_last)

    # Options records reach every in-process collector with the final totals.
    for name, records in (("udp", udp_records), ("tcp", tcp.records)):
        metering = options_records(records, METERING_TEMPLATE_ID)[-1]
        assert metering["packetTotalCount"] == n_packets and metering["ignoredPacketTotalCount"] == 0, (name, metering)
        reliability = options_records(records, RELIABILITY_TEMPLATE_ID)[-1]
        assert reliability["notSentFlowTotalCount"] == 0, (name, reliability)
        assert options_records(records, CONFIG_TEMPLATE_ID)[-1]["samplingInterval"] == 1

    # tshark: every datagram to the built-in collector decodes as IPFIX, options records included.
    assert packets, "tshark captured nothing"
    assert "Malformed" not in expert and "Errors" not in expert and "Malformed" not in tshark_stderr, expert
    other = re.findall(r"^\s*\d+\s+(?!Sequence)\w+\s+\w+", expert, re.M)
    assert other == [], expert
    decoded: list[tuple[int, dict[str, Any]]] = []
    for pkt in packets:
        layers = pkt["_source"]["layers"]
        assert "cflow" in layers, f"tshark did not decode a datagram as IPFIX: {list(layers)}"
        decoded.extend(flow_sets(layers["cflow"]))
    assert sum(1 for sid, _ in decoded if sid in (256, 257)) == n_flows
    config = [r for sid, r in decoded if sid == CONFIG_TEMPLATE_ID]
    assert config and all(int(r["cflow.sampling_interval"]) == 1 for r in config), config[:1]
    keys = {int(r["cflow.template_id"]) for sid, r in decoded if sid == FLOW_KEYS_TEMPLATE_ID and "cflow.post_key" in r}
    assert keys == {256, 257}
    assert any(sid == RELIABILITY_TEMPLATE_ID and "cflow.notsent_flows" in r for sid, r in decoded)
