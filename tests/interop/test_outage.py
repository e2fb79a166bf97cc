"""Collector outages of 30 s (issue 4 item 6), with the real exporter on a real XDP attach.

UDP: the exporter starts while nothing listens on the collector's port and keeps scanning for 30 s
(ICMP port unreachable comes back for every datagram); then the built-in collector starts. The
exporter must not exit, must say "collector unreachable" once per state change rather than once
per datagram, and the collector must decode data within one template refresh interval
(`--template-refresh 5`) of starting, with no set of an unknown template after that. What was
exported during the outage is lost; datagrams the kernel refused after the ICMP errors count as
not sent.

TCP: two exporters at once, each with its own namespaces and TCP collector, share one 30 s outage
(backoff is up to 30 s with full jitter, so the reconnect alone can take that long again):
- a queue large enough for the outage: every flow exported while the collector was away arrives
  after the reconnect, exactly, and the sequence numbers run on across the two connections with no
  gap (the collector keeps one session for both connections on purpose);
- `--tcp-queue-size 1`: options-only messages go first when the queue overflows, but a one-message
  queue keeps only the newest of them, so the message holding the outage's flows is pushed out
  too, and that loss is counted exactly: "stopped" says
  not_sent flows + flows received = flows exported, the last notSentFlow/Packet/OctetTotalCount
  options record the collector decoded says the same, and the sequence gap it saw across the
  reconnect is exactly the records of the dropped messages.

Log lines are read with `log_events`, which also splits lines written into one another, so that
such a regression (see the last test) fails on what it broke rather than on a missing event.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime
from typing import Any

import pytest

from collectors.server import Collector, stderr_logger
from exporter.ipfix import RELIABILITY_TEMPLATE_ID
from tests.interop.collecting import (
    NetnsLoop,
    TcpCollector,
    expected_totals,
    flow_records,
    options_records,
    totals,
)
from tools import trafgen
from tools.netns import VethPair
from tools.packets import Flow, standard_mix

PORT = 4739
OUTAGE = 30.0
REFRESH = 5.0
SMALL_QUEUE = 1
COMMON = ("--scan-interval", "0.5", "--idle-timeout", "1", "--active-timeout", "60", "--max-entries", "4096",
          "--log-level", "debug")


# -- reading the exporter's log ---------------------------------------------------------------------

def split_objects(text: str) -> Iterator[dict[str, Any]]:
    """Every JSON object in `text`, also when several were written on one line."""
    dec = json.JSONDecoder()
    pos = text.find("{")
    while pos >= 0:
        try:
            obj, end = dec.raw_decode(text, pos)
        except ValueError:
            pos = text.find("{", pos + 1)
            continue
        if isinstance(obj, dict):
            yield obj
        pos = text.find("{", end)


def log_events(p: Any, event: str | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for rec in p.logs:
        out.extend(split_objects(rec["line"]) if rec.get("event") == "_raw" else [rec])
    return [r for r in out if event is None or r.get("event") == event]


def wait_event(p: Any, event: str, timeout: float = 30, **match: Any) -> dict[str, Any]:
    """The first `event` line whose fields include `match`, reading the process' stderr as it comes."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in log_events(p, event) if all(r.get(k) == v for k, v in match.items())]
        if found:
            return found[0]
        assert not p._ended, f"exporter exited ({p.popen.wait()}) before logging {event!r}: {p.logs[-5:]}"
        assert time.monotonic() < deadline, f"no {event!r} {match} within {timeout}s; last: {log_events(p)[-5:]}"
        p._take(0.1)  # conftest.Proc's reader: moves one stderr line into p.logs


def wait_exported(p: Any, n: int, timeout: float = 20) -> None:
    """Until the exporter's scans have expired `n` flow records in all."""
    deadline = time.monotonic() + timeout
    while sum(s["exported"] for s in log_events(p, "scan")) < n:
        assert time.monotonic() < deadline, f"{n} flows not exported: {log_events(p, 'scan')[-2:]}"
        p._take(0.1)


def drain_logs(p: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        p._take(0.05)


# -- UDP ------------------------------------------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.interop
def test_udp_collector_absent_30s_then_back(veth: VethPair, xdpflow_proc: Any) -> None:
    during, after = standard_mix(), standard_mix()
    with NetnsLoop(veth.obs) as loop:
        p = xdpflow_proc(veth.obs, "run", "--interface", veth.obs_if, "--collector", f"udp://127.0.0.1:{PORT}",
                         "--template-refresh", str(REFRESH), *COMMON)
        p.wait_ready()
        t_down = time.monotonic()
        trafgen.send_flows(veth.gen, veth.gen_if, during)
        wait_exported(p, len(during))
        drain_logs(p, t_down + OUTAGE - time.monotonic())
        assert p.popen.poll() is None, "the exporter exited while the collector was away"
        scans_down = len(log_events(p, "scan"))

        c = Collector(("127.0.0.1", PORT), count_options=True, log=stderr_logger("json", "warning"))

        async def first_decode() -> tuple[bool, float, int]:
            await c.start()
            t_up = time.monotonic()
            ok = await c.wait_until(lambda c: c.stats.records > 0, timeout=REFRESH + 5)
            return ok, time.monotonic() - t_up, c.stats.unknown_template_sets

        try:
            decoded, delay, unknown_before = loop.run(first_decode())
            assert decoded, f"nothing decoded within {REFRESH + 5}s of the collector's return: {c.counters()}"
            trafgen.send_flows(veth.gen, veth.gen_if, after)
            wait_exported(p, len(during) + len(after))
            assert loop.run(c.wait_until(lambda c: len(flow_records(c.records)) >= len(after), timeout=5))
            rc, _ = p.stop()
            time.sleep(0.3)
            records = list(c.records)
            stats = c.counters()
        finally:
            loop.run(c.close())

    assert rc == 0, p.logs[-5:]
    # Templates within one refresh interval (plus one scan) of the collector's return.
    assert delay <= REFRESH + 1.0, delay
    assert stats["unknown_template_sets"] == unknown_before, "data sets without a template after templates came"
    assert stats["gaps"] == 0 and stats["malformed"] == 0, stats
    # What was exported during the outage is gone (nobody listened); what came after is exact.
    assert len(flow_records(records)) == len(after)
    assert totals(records) == expected_totals([after])

    stopped = log_events(p, "stopped")[0]
    st = stopped["sent"][f"udp://127.0.0.1:{PORT}"]
    assert stopped["records_exported"] == len(during) + len(after)
    # ICMP port unreachable came back for (nearly) every datagram of the outage: one line says so,
    # and one more when the collector is back.
    assert st["send_errors"] >= scans_down // 2, (st, scans_down)
    unreachable = log_events(p, "collector unreachable")
    back = log_events(p, "collector reachable again")
    assert len(unreachable) == 1, unreachable
    assert len(back) == 1, back
    print(f"udp outage: {scans_down} scans while away, send_errors={st['send_errors']}, "
          f"messages={st['messages']}, not_sent_flows={st['not_sent_flows']}, first decode {delay:.2f}s "
          f"after return, unknown-template sets before it {unknown_before}")


# -- TCP ------------------------------------------------------------------------------------------

class Side:
    """One exporter and its TCP collector, in their own namespaces."""

    def __init__(self, stack: ExitStack, veth: VethPair, xdpflow_proc: Any, queue: int | None) -> None:
        self.veth = veth
        self.queue = queue
        self.loop = stack.enter_context(NetnsLoop(veth.obs))
        self.tcp = TcpCollector(PORT, session="exporter")  # one session across reconnects: gaps show
        self.loop.run(self.tcp.start())
        stack.callback(lambda: self.loop.run(self.tcp.stop()))
        args = ["--tcp-queue-size", str(queue)] if queue is not None else []
        self.p = xdpflow_proc(veth.obs, "run", "--interface", veth.obs_if, "--collector",
                              f"tcp://127.0.0.1:{PORT}", *args, *COMMON)
        stack.callback(self.p.kill)  # before the namespaces go

    def send(self, flows: list[Flow]) -> None:
        trafgen.send_flows(self.veth.gen, self.veth.gen_if, flows)

    async def stop_after_next_message(self) -> None:
        """Close right after a message arrived: no message of the exporter's is in flight then."""
        seen = len(self.tcp.arrivals)
        while len(self.tcp.arrivals) == seen:
            await self.tcp.changed.wait()
        await self.tcp.stop()


@pytest.mark.kernel
@pytest.mark.interop
def test_tcp_collector_down_30s_then_back(veth: VethPair, xdpflow_proc: Any) -> None:
    during, after = standard_mix(), standard_mix()
    with ExitStack() as stack:
        other = stack.enter_context(VethPair())
        big, small = Side(stack, veth, xdpflow_proc, None), Side(stack, other, xdpflow_proc, SMALL_QUEUE)
        sides = (big, small)
        for s in sides:
            s.p.wait_ready()
        for s in sides:
            s.loop.run(s.stop_after_next_message(), timeout=10)
        t_down = time.monotonic()
        for s in sides:
            wait_event(s.p, "collector disconnected", timeout=10)
            s.send(during)
        for s in sides:
            wait_exported(s.p, len(during))
        for s in sides:
            drain_logs(s.p, t_down + OUTAGE - time.monotonic())
            assert s.p.popen.poll() is None
            s.loop.run(s.tcp.start())
        t_up = time.time()
        reconnected = {}
        for s in sides:
            # Full-jitter backoff capped at 30 s: the next attempt may be up to 30 s away.
            ev = wait_event(s.p, "collector connected", timeout=40, connection=2)
            reconnected[s.queue] = (ev, datetime.fromisoformat(ev["timestamp"]).timestamp() - t_up)
        assert big.loop.run(big.tcp.wait_flows(len(during), timeout=10))
        small.send(after)
        wait_exported(small.p, len(during) + len(after))
        assert small.loop.run(small.tcp.wait_flows(len(after), timeout=10))
        results = {}
        for s in sides:
            rc, _ = s.p.stop()
            assert rc == 0, s.p.logs[-5:]
            results[s.queue] = log_events(s.p, "stopped")[0]
        for s in sides:
            s.loop.run(s.tcp.stop())

    endpoint = f"tcp://127.0.0.1:{PORT}"
    figures = []
    for s in sides:
        tcp, stopped = s.tcp, results[s.queue]
        st = stopped["sent"][endpoint]
        connected, reconnect_s = reconnected[s.queue]
        assert tcp.connections == 2, tcp.connections
        assert tcp.first_has_templates == [True, True], "templates first on every connection"
        assert tcp.leftover == [0, 0] and not tcp.malformed and tcp.unknown_sets == 0, (tcp.leftover, tcp.malformed)
        assert st["connections"] == 2 and st["template_messages"] == 2, st
        figures.append(f"queue={s.queue or 'default'}: reconnected {reconnect_s:.1f}s after return, "
                       f"queued={connected['queued']}, dropped_while_down={connected['dropped_while_down']}, "
                       f"messages on connection 2={tcp.messages[1]}, not_sent_flows={st['not_sent_flows']}, "
                       f"not_sent_packets={st['not_sent_packets']}, messages_dropped={st['messages_dropped']}")
    print("tcp outage: " + "; ".join(figures))

    # Within the queue bound: every flow of the outage arrives after the reconnect, exactly, and the
    # numbering runs on across both connections.
    tcp, st = big.tcp, results[None]["sent"][endpoint]
    assert results[None]["records_exported"] == len(during)
    assert totals(tcp.records) == expected_totals([during]) and len(flow_records(tcp.records)) == len(during)
    assert tcp.gaps == [], tcp.gaps
    assert st["messages_dropped"] == 0 and st["not_sent_flows"] == 0 and st["records"] == len(during), st
    queued = reconnected[None][0]
    assert queued["dropped_while_down"] == 0 and queued["queued"] >= OUTAGE / 0.5 - 5, queued
    assert options_records(tcp.records, RELIABILITY_TEMPLATE_ID)[-1]["notSentFlowTotalCount"] == 0

    # Past the bound: the outage's flows were pushed out and counted, exactly, everywhere.
    tcp, stopped = small.tcp, results[SMALL_QUEUE]
    st = stopped["sent"][endpoint]
    connected = reconnected[SMALL_QUEUE][0]
    lost_packets = sum(fl.count for fl in during)
    lost_octets = sum(fl.count * fl.octets_per_packet for fl in during)
    assert connected["queued"] == SMALL_QUEUE and connected["dropped_while_down"] == st["messages_dropped"] > 0
    assert tcp.messages[1] > SMALL_QUEUE, "the queued messages (and the templates before them) arrived"
    assert st["not_sent_flows"] == len(during) and st["not_sent_packets"] == lost_packets, st
    assert st["records_dropped"] == len(during), st
    received = flow_records(tcp.records)
    assert totals(tcp.records) == expected_totals([after])
    assert len(received) + st["not_sent_flows"] == stopped["records_exported"] == len(during) + len(after)
    reliability = options_records(tcp.records, RELIABILITY_TEMPLATE_ID)
    counts = [r["notSentFlowTotalCount"] for r in reliability]
    assert counts == sorted(counts), counts
    last = reliability[-1]
    assert (last["notSentFlowTotalCount"], last["notSentPacketTotalCount"], last["notSentOctetTotalCount"]) == (
        len(during), lost_packets, lost_octets), last
    # The one gap the collector saw across the reconnect is the dropped messages' records: the flows
    # and, options records counting (rfc), each dropped scan's options records.
    # A scan's message carries the same options records each time (the templates' messages add the
    # interface names): the most common count per received message is what each dropped one held.
    per_scan = Counter(Counter(r.sequence for r in tcp.records if r.is_options).values()).most_common(1)[0][0]
    assert [g.delta for g in tcp.gaps] == [len(during) + per_scan * st["messages_dropped"]], (tcp.gaps, per_scan)


# -- startup ------------------------------------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.interop
def test_state_changes_during_startup_are_logged_whole(veth: VethPair, xdpflow_proc: Any) -> None:
    """The event loop logs while the kernel program compiles (xdp/loader.py points fd 2 at a temporary
    file then): a TCP collector connects and a closed UDP port answers ICMP at that moment. Before
    exporter/logs.py gave the logger its own duplicate of stderr those lines were lost, or ran into the
    next line (about half of all starts)."""
    with NetnsLoop(veth.obs) as loop:
        tcp = loop.run(TcpCollector(PORT).start())
        try:
            p = xdpflow_proc(veth.obs, "run", "--interface", veth.obs_if, "--collector", f"udp://127.0.0.1:{PORT}",
                             "--collector", f"tcp://127.0.0.1:{PORT}", *COMMON)
            p.wait_ready()
            drain_logs(p, 1.0)
            rc, _ = p.stop()
        finally:
            loop.run(tcp.stop())
    assert rc == 0
    assert [r["line"] for r in p.logs if r.get("event") == "_raw"] == [], "log lines ran into one another"
    assert [r["collector"] for r in p.events("collector unreachable")] == [f"udp://127.0.0.1:{PORT}"]
    assert [r["connection"] for r in p.events("collector connected")] == [1]
