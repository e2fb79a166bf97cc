"""One exporter, three collectors at once: nfcapd (UDP), the built-in collector (UDP) and IPFIX over TCP.

Every collector runs on the observer namespace's loopback. The built-in collector speaks UDP only
(collectors/server.py), so the TCP side is `TcpCollector` below: an asyncio server that cuts the
stream into IPFIX messages by the header's length field (RFC 7011 section 10.4) and feeds each to
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

import asyncio
import contextlib
import ipaddress
import os
import re
import struct
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any, TypeVar

import pytest

from collectors.decoder import DataRecord, Decoder, SequenceGap
from collectors.server import Collector, stderr_logger
from exporter.ipfix import CONFIG_TEMPLATE_ID, FLOW_KEYS_TEMPLATE_ID, METERING_TEMPLATE_ID, RELIABILITY_TEMPLATE_ID
from tests.interop.test_export_nfcapd import nf_key
from tests.interop.test_tshark_options import flow_sets
from tools import trafgen
from tools.external import Nfcapd, Tshark
from tools.netns import VethPair
from tools.packets import ICMP, ICMPV6, Flow, standard_mix
from xdp.loader import setns

NFCAPD_PORT = 9995
UDP_PORT = 4739
TCP_PORT = 4741
IPFIX_HEADER = struct.Struct("!HHIII")

T = TypeVar("T")
Key = tuple[str, str, int, int, int, int]


# -- helpers, also used by test_sequence_modes.py and test_outage.py --------------------------------

def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into network namespace `name`."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        setns(fd)
    finally:
        os.close(fd)


class NetnsLoop:
    """An asyncio loop on a thread inside a network namespace: sockets it creates live there."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> NetnsLoop:
        ready = threading.Event()
        failed: list[BaseException] = []

        def main() -> None:
            try:
                enter_netns(self.netns)
            except BaseException as e:
                failed.append(e)
                ready.set()
                return
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self._thread = threading.Thread(target=main, name=f"netns-loop-{self.netns}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failed:
            self.loop.close()
            raise failed[0]
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc: object) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread is not None and self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.run(cancel_all(), timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()


class TcpCollector:
    """IPFIX over TCP on loopback: each connection is one transport session of `decoder`.

    `session="connection"` names the session after the connection (RFC 7011: a new connection is a
    new session, sequence checking restarts); `session="exporter"` keeps one session across
    reconnects, so the decoder also checks that the numbering continues from one connection to
    the next.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", *, count_options: bool = True,
                 session: str = "connection") -> None:
        self.host, self.port, self.session = host, port, session
        self.decoder = Decoder(count_options=count_options)
        self.records: list[DataRecord] = []
        self.gaps: list[SequenceGap] = []
        self.unknown_sets = 0
        self.malformed: list[str] = []
        self.connections = 0
        self.messages: list[int] = []          # messages per finished connection
        self.leftover: list[int] = []          # octets of an unfinished message when a connection ended
        self.first_has_templates: list[bool] = []
        self.arrivals: list[tuple[float, int]] = []  # (monotonic time, flow records) per message
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.changed = asyncio.Event()

    async def start(self) -> TcpCollector:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        return self

    async def stop(self) -> None:
        """Close the listener and every connection: the port refuses connections afterwards."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.close()
        await asyncio.sleep(0.05)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.connections
        self.connections += 1
        self._writers.add(writer)
        name = f"tcp#{conn}" if self.session == "connection" else "tcp"
        buf = bytearray()
        count = 0
        try:
            while chunk := await reader.read(1 << 16):
                buf += chunk
                while len(buf) >= IPFIX_HEADER.size:
                    version, length = struct.unpack_from("!HH", buf)
                    if version != 10 or length < IPFIX_HEADER.size:
                        self.malformed.append(f"connection {conn}: header version {version} length {length}")
                        return
                    if len(buf) < length:
                        break
                    msg = bytes(buf[:length])
                    del buf[:length]
                    if count == 0:
                        self.first_has_templates.append(2 in set_ids(msg))
                    count += 1
                    res = self.decoder.feed(msg, name)
                    self.records.extend(res.records)
                    self.gaps.extend(res.gaps)
                    self.unknown_sets += len(res.unknown_sets)
                    self.malformed.extend(f"{m.reason}: {m.detail}" for m in res.malformed)
                    self.arrivals.append((time.monotonic(), sum(not r.is_options for r in res.records)))
                    self.changed.set()
                    self.changed = asyncio.Event()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.messages.append(count)
            self.leftover.append(len(buf))
            self._writers.discard(writer)
            writer.close()

    async def wait_flows(self, n: int, timeout: float) -> bool:
        """Wait until `n` flow (non-options) records arrived in total."""
        deadline = time.monotonic() + timeout
        while len(flow_records(self.records)) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return True


def set_ids(message: bytes) -> list[int]:
    out, pos = [], IPFIX_HEADER.size
    while pos + 4 <= len(message):
        sid, slen = struct.unpack_from("!HH", message, pos)
        out.append(sid)
        pos += max(slen, 4)
    return out


def flow_records(records: Iterable[DataRecord]) -> list[DataRecord]:
    return [r for r in records if not r.is_options]


def options_records(records: Iterable[DataRecord], template_id: int) -> list[dict[str, Any]]:
    return [r.fields for r in records if r.is_options and r.template_id == template_id]


def record_key(f: dict[str, Any]) -> Key:
    """A decoded flow record's key in tools.packets.Flow.key form (ICMP: type/code as the port)."""
    src = f.get("sourceIPv4Address") or f.get("sourceIPv6Address")
    dst = f.get("destinationIPv4Address") or f.get("destinationIPv6Address")
    proto = int(f["protocolIdentifier"])
    if proto in (ICMP, ICMPV6):
        sport, dport = 0, int(f.get("icmpTypeCodeIPv4") or f.get("icmpTypeCodeIPv6") or 0)
    else:
        sport, dport = int(f["sourceTransportPort"]), int(f["destinationTransportPort"])
    return (str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)), proto, sport, dport,
            int(f.get("vlanId", 0)))


def key_totals(fields: Iterable[dict[str, Any]]) -> dict[Key, tuple[int, int]]:
    """(packets, octets) per flow key, summed over the flow records (decoded field dicts) given."""
    packets: Counter[Key] = Counter()
    octets: Counter[Key] = Counter()
    for f in fields:
        k = record_key(f)
        packets[k] += int(f["packetDeltaCount"])
        octets[k] += int(f["octetDeltaCount"])
    return {k: (packets[k], octets[k]) for k in packets}


def totals(records: Iterable[DataRecord]) -> dict[Key, tuple[int, int]]:
    return key_totals(r.fields for r in flow_records(records))


def expected_totals(batches: Iterable[Iterable[Flow]]) -> dict[Key, tuple[int, int]]:
    packets: Counter[Key] = Counter()
    octets: Counter[Key] = Counter()
    for batch in batches:
        for fl in batch:
            packets[fl.key] += fl.count
            octets[fl.key] += fl.count * fl.octets_per_packet
    return {k: (packets[k], octets[k]) for k in packets}


def nfcapd_totals(flows: Iterable[dict[str, Any]]) -> dict[Key, tuple[int, int]]:
    packets: Counter[Key] = Counter()
    octets: Counter[Key] = Counter()
    for r in flows:
        k = nf_key(r)
        packets[k] += int(r["in_packets"])
        octets[k] += int(r["in_bytes"])
    return {k: (packets[k], octets[k]) for k in packets}


def nfcapd_sequence_errors(log: str, stat: str) -> tuple[int, int]:
    """(nfcapd's "Sequence Errors" at exit, nfdump -I "Sequence failures" summed over the files)."""
    at_exit = [int(n) for n in re.findall(r"Sequence Errors: (\d+)", log)]
    stored = [int(n) for n in re.findall(r"Sequence failures: (\d+)", stat)]
    assert at_exit and stored, (log, stat)
    return sum(at_exit), sum(stored)


def send_batches(veth: VethPair, proc: Any, batches: list[list[Flow]]) -> None:
    """Send each batch, then wait until the exporter has exported it (idle timeout), before the next."""
    exported = 0
    for batch in batches:
        trafgen.send_flows(veth.gen, veth.gen_if, batch)
        exported += len(batch)
        deadline = time.monotonic() + 20
        while sum(s["exported"] for s in proc.events("scan")) < exported:
            assert time.monotonic() < deadline, f"batch not exported: {proc.events('scan')[-3:]}"
            proc.wait_for("scan", count=len(proc.events("scan")) + 1, timeout=5)


@contextlib.contextmanager
def tcp_collector(loop: NetnsLoop, port: int, **kw: Any) -> Iterator[TcpCollector]:
    c = loop.run(TcpCollector(port, **kw).start())
    try:
        yield c
    finally:
        loop.run(c.stop())


@contextlib.contextmanager
def udp_collector(loop: NetnsLoop, port: int, count_options: bool) -> Iterator[Collector]:
    c = Collector(("127.0.0.1", port), count_options=count_options, log=stderr_logger("json", "warning"))
    loop.run(c.start())
    try:
        yield c
    finally:
        loop.run(c.close())


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
