"""Shared by the interop tests: in-process collectors (TcpCollector over a thread in the observer
namespace, the built-in UDP collector), reading what real collectors stored (nfcapd keys, tshark's
decoded sets), and the totals every test compares.
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
from pathlib import Path
from typing import Any, TypeVar

from collectors.decoder import DataRecord, Decoder, SequenceGap
from collectors.server import Collector, stderr_logger
from exporter.ipfix.encoder import MESSAGE_HEADER as IPFIX_HEADER
from tools import trafgen
from tools.netns import VethPair
from tools.packets import ICMP, ICMPV6, Flow, checksum
from xdp.attach import setns

NFCAPD_PORT = 9995
UDP_PORT = 4739
TCP_PORT = 4741

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


def nf_key(r: dict[str, Any]) -> tuple[str, str, int, int, int, int]:
    src = str(ipaddress.ip_address(r.get("src4_addr") or r.get("src6_addr")))
    dst = str(ipaddress.ip_address(r.get("dst4_addr") or r.get("dst6_addr")))
    proto = int(r["proto"])
    if proto in (ICMP, ICMPV6):
        sport, dport = 0, (int(r.get("icmp_type", 0)) << 8) | int(r.get("icmp_code", 0))
    else:
        sport, dport = int(r.get("src_port", 0)), int(r.get("dst_port", 0))
    return (src, dst, proto, sport, dport, int(r.get("src_vlan", 0)))


def flow_sets(layer: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """(set id, fields) of every decoded record, found by tshark's "Set n [id=X]" / "Flow n" tree labels."""
    if isinstance(layer, dict):
        for key, value in layer.items():
            m = re.fullmatch(r"Set \d+ \[id=(\d+)\].*", key)
            if m and isinstance(value, dict):
                for sub, rec in value.items():
                    if sub.startswith("Flow ") and isinstance(rec, dict):
                        yield int(m.group(1)), rec
            else:
                yield from flow_sets(value)
    elif isinstance(layer, list):
        for item in layer:
            yield from flow_sets(item)


# -- captures for tshark: frames and a pcap file ----------------------------------------------------

IPFIX_PORT = 4739
PCAP_HEADER = struct.Struct("<IHHiIII")
PCAP_RECORD = struct.Struct("<IIII")
LINKTYPE_ETHERNET = 1


def udp_frame(payload: bytes, src: str, dst: str, sport: int, dport: int = IPFIX_PORT) -> bytes:
    """One Ethernet/IPv4/UDP frame with valid IP and UDP checksums."""
    s, d = bytes(map(int, src.split("."))), bytes(map(int, dst.split(".")))
    ulen = 8 + len(payload)
    udp_sum = checksum(s + d + struct.pack("!BBH", 0, 17, ulen) + struct.pack("!HHHH", sport, dport, ulen, 0)
                        + payload) or 0xFFFF
    udp = struct.pack("!HHHH", sport, dport, ulen, udp_sum)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0x4000, 64, 17, 0, s, d))
    struct.pack_into("!H", ip, 10, checksum(bytes(ip)))
    ether = bytes.fromhex("020000000002" "020000000001" "0800")
    return ether + bytes(ip) + udp + payload


def write_pcap(path: Path, frames: list[tuple[float, bytes]]) -> None:
    with path.open("wb") as f:
        f.write(PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET))
        for ts, frame in frames:
            f.write(PCAP_RECORD.pack(int(ts), int(ts % 1 * 1_000_000), len(frame), len(frame)))
            f.write(frame)
