"""The sweep's accounting collector: `python -m tools.sweep sink [--port N]`, one per phase.

It holds datagrams during the run (a recv and an append each, so its CPU in the measured window
stays small) and tallies them after the stop, with a 256 MiB socket buffer so the end-of-run
burst of a million records is not lost at the collector. The tally sums packet and octet
counters of plain data sets with numpy straight from the set body, once the project's decoder
(collectors.decoder) has seen their template; anything else (templates, options records,
anything unusual) goes through the decoder itself.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

COLLECTOR_PORT = 9995
SINK_BUFFER = 256 << 20           # the accounting collector's socket buffer (SO_RCVBUFFORCE)
_PACKET_IES = (2, 86)    # packetDeltaCount, packetTotalCount
_OCTET_IES = (1, 85)     # octetDeltaCount, octetTotalCount
_IGNORED_PACKETS = "ignoredPacketTotalCount"


@dataclass
class Tally:
    """Packet and record totals of an IPFIX stream, fast enough for millions of records.

    Datagrams holding templates, options data or anything unusual go through
    the project's RFC 7011 decoder (collectors.decoder); plain data sets of a
    known fixed-length template are summed with numpy straight from the set
    body. The last ignoredPacketTotalCount seen per session is the exporter's
    reported loss.
    """

    datagrams: int = 0
    records: int = 0
    packets: int = 0
    octets: int = 0
    options_records: int = 0
    slow_datagrams: int = 0
    malformed: int = 0
    ignored: dict[tuple[str, int], int] = field(default_factory=dict)
    _decoder: Any = None
    _dtypes: dict[tuple[str, int, int], Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from collectors.decoder import Decoder

        self._decoder = Decoder(count_options=False)

    @property
    def ignored_packets(self) -> int:
        return sum(self.ignored.values())

    def summary(self) -> dict[str, int]:
        return {"datagrams": self.datagrams, "records": self.records, "packets": self.packets,
                "octets": self.octets, "options_records": self.options_records,
                "ignored_packets": self.ignored_packets, "slow_datagrams": self.slow_datagrams,
                "malformed": self.malformed}

    def _fast_sets(self, data: bytes, exporter: str) -> list[tuple[Any, int, int]] | None:
        """(dtype, start, end) per data set when every set is plain data of a known template, else None."""
        import struct

        if len(data) < 16:
            return None
        version, length, _, _, odid = struct.unpack_from("!HHIII", data)
        if version != 10 or length != len(data):
            return None
        sets = []
        off = 16
        while off + 4 <= length:
            set_id, set_len = struct.unpack_from("!HH", data, off)
            if set_len < 4 or off + set_len > length:
                return None
            dt = self._dtypes.get((exporter, odid, set_id))
            if set_id < 256 or dt is None:
                return None
            sets.append((dt, off + 4, off + set_len))
            off += set_len
        return sets if off == length else None

    def _learn(self, exporter: str, odid: int) -> None:
        import numpy as np

        for tid, tpl in self._decoder.templates(exporter, odid).items():
            key = (exporter, odid, tid)
            if tpl.is_options or any(f.variable for f in tpl.fields):
                self._dtypes.pop(key, None)
                continue
            names: list[str] = []
            formats: list[str] = []
            offsets: list[int] = []
            pos = 0
            for f in tpl.fields:
                if f.enterprise == 0 and f.length in (1, 2, 4, 8) and (
                        f.element_id in _PACKET_IES or f.element_id in _OCTET_IES):
                    name = "p" if f.element_id in _PACKET_IES else "o"
                    if name not in names:
                        names.append(name)
                        formats.append(f">u{f.length}")
                        offsets.append(pos)
                pos += f.length
            self._dtypes[key] = np.dtype({"names": names, "formats": formats, "offsets": offsets,
                                          "itemsize": pos})

    def add(self, data: bytes, exporter: str = "-") -> None:
        import numpy as np

        self.datagrams += 1
        sets = self._fast_sets(data, exporter)
        if sets is not None:
            for dt, start, end in sets:
                n = (end - start) // dt.itemsize
                if n <= 0:
                    continue
                arr = np.frombuffer(data, dtype=dt, count=n, offset=start)
                self.records += n
                if "p" in dt.names:
                    self.packets += int(arr["p"].sum(dtype=np.uint64))
                if "o" in dt.names:
                    self.octets += int(arr["o"].sum(dtype=np.uint64))
            return
        self.slow_datagrams += 1
        res = self._decoder.feed(data, exporter)
        self.malformed += len(res.malformed)
        for rec in res.records:
            if rec.is_options:
                self.options_records += 1
                if _IGNORED_PACKETS in rec.fields:
                    self.ignored[(rec.exporter, rec.odid)] = int(rec.fields[_IGNORED_PACKETS])  # type: ignore[arg-type]
                continue
            self.records += 1
            f = rec.fields
            self.packets += int(f.get("packetDeltaCount", f.get("packetTotalCount", 0)))  # type: ignore[arg-type]
            self.octets += int(f.get("octetDeltaCount", f.get("octetTotalCount", 0)))  # type: ignore[arg-type]
        if len(data) >= 16:
            import struct

            self._learn(exporter, struct.unpack_from("!I", data, 12)[0])


def sink_main(argv: Sequence[str] | None = None) -> int:
    """Hold every datagram until SIGTERM, then tally them and print one JSON summary line."""
    import argparse
    import socket

    p = argparse.ArgumentParser(prog="python -m tools.sweep sink")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=COLLECTOR_PORT)
    p.add_argument("--rcvbuf", type=int, default=SINK_BUFFER)
    args = p.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (33, socket.SO_RCVBUF):   # SO_RCVBUFFORCE (needs CAP_NET_ADMIN), else what rmem_max allows
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, args.rcvbuf)
            break
        except OSError:
            continue
    sock.bind((args.host, args.port))
    sock.settimeout(0.2)
    stop = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print(json.dumps({"event": "listening", "rcvbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)}),
          flush=True)
    held: list[tuple[bytes, Any]] = []
    while not stop:
        try:
            held.append(sock.recvfrom(65535))
        except TimeoutError:
            continue
        except InterruptedError:
            continue
    sock.setblocking(False)
    while True:
        try:
            held.append(sock.recvfrom(65535))
        except (BlockingIOError, InterruptedError):
            break
    sock.close()
    tally = Tally()
    for data, addr in held:
        tally.add(data, f"{addr[0]}:{addr[1]}")
    print(json.dumps({"event": "summary", **tally.summary()}), flush=True)
    return 0
