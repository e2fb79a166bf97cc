"""asyncio UDP front end for the sans-IO decoder: the built-in collector.

Theory of operation. :class:`Collector` binds one UDP socket (IPv4 or IPv6) through
``loop.create_datagram_endpoint``; every datagram goes straight to :meth:`Decoder.feed` with the
exporter named ``host:port`` (``[v6]:port``), so a session is one exporter socket plus one
observation domain, as RFC 7011 defines a UDP transport session. Decoding is synchronous in the
protocol callback: it is cheap, and it keeps records in arrival order without queues.

Each data record becomes one output line (JSON object with IANA element names and ``_``-prefixed
metadata, or ``exporter odid=.. tid=.. name=value ...`` text), written per datagram and flushed.
Sequence gaps, malformed input and data without templates are logged through structlog on stderr,
rate-limited per kind so a hostile sender cannot flood the log; the counters in
:attr:`Collector.stats` and :meth:`Collector.counters` always hold the full totals. Tests use the
same object in-process: ``async with Collector(("127.0.0.1", 0)) as c`` exposes the bound
:attr:`port`, bounded deques of recent records, gaps and malformed events, and
:meth:`wait_for_records`.

What the decoder keeps is bounded (see :mod:`collectors.decoder`): sessions, templates per session,
fields per template and a memory budget for templates, the decoder's defaults unless given. As a
UDP collector it also expires templates not refreshed for ``template_lifetime`` (1800 s: three
times a 600 s refresh, a common exporter setting; xdpflow's own is 60 s), on a monotonic clock,
and ignores template withdrawals, which RFC 7011 says MUST NOT be sent over UDP. The first time a
limit is hit it gets one ``decoder limit hit`` line naming the limit, its setting, the exporter and
what was dropped; after that hits are counted, and only every 1000th is logged again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import structlog

from collectors.decoder import (
    DataRecord,
    Decoder,
    DecoderStats,
    ElementInfo,
    FeedResult,
    Malformed,
    SequenceGap,
    Value,
)
from exporter.address import AddressError, parse_address

DEFAULT_PORT = 4739
UDP_TEMPLATE_LIFETIME = 1800.0
_SO_RCVBUFFORCE = 33  # Linux; needs CAP_NET_ADMIN, not exported by the socket module
_META = ("_exporter", "_odid", "_template_id", "_options", "_export_time", "_sequence")


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` (port 0: any) to ``(host, port)``; ValueError with a readable message."""
    try:
        listen = parse_address(value, min_port=0)
    except AddressError as e:
        raise ValueError(f"bad --listen {value!r}: {e}") from None
    return listen.host, listen.port


def format_exporter(addr: Any) -> str:
    """A socket address tuple as ``host:port``, IPv6 hosts bracketed."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


def _jsonable(v: Value) -> Value:
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


def record_json(rec: DataRecord) -> str:
    """One JSON object: element names as keys plus ``_exporter``, ``_odid``, ``_options``..."""
    obj: dict[str, Value] = dict(
        zip(
            _META,
            (rec.exporter, rec.odid, rec.template_id, rec.is_options, rec.export_time, rec.sequence),
            strict=True,
        )
    )
    if rec.is_options:
        obj["_scope"] = ",".join(rec.scope)
    for k, v in rec.fields.items():
        obj[k] = _jsonable(v)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _text_value(v: Value) -> str:
    if isinstance(v, str):
        return v if v and v.isprintable() and not any(c in v for c in ' ="') else json.dumps(v)
    return str(v)


def record_text(rec: DataRecord) -> str:
    """``exporter odid=N tid=N [options] name=value ...`` on one line."""
    head = f"{rec.exporter} odid={rec.odid} tid={rec.template_id}" + (" options" if rec.is_options else "")
    return head + "".join(f" {k}={_text_value(v)}" for k, v in rec.fields.items())


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "console", "json")


def stderr_logger(fmt: str = "auto", level: str = "info") -> Any:
    """A structlog logger on the current stderr, independent of global structlog configuration.

    ``fmt`` is ``console``, ``json`` or ``auto`` (console on a terminal, JSON lines otherwise).
    """
    if fmt not in LOG_FORMATS or level not in LOG_LEVELS:
        raise ValueError(f"log format must be one of {LOG_FORMATS} and level one of {LOG_LEVELS}")
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    return structlog.wrap_logger(
        structlog.PrintLogger(file=sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
    )


def _set_rcvbuf(sock: socket.socket, size: int) -> int:
    """Ask for a receive buffer of ``size``, past rmem_max when privileged; returns what the kernel gave."""
    options = ([_SO_RCVBUFFORCE] if sys.platform == "linux" else []) + [socket.SO_RCVBUF]
    for opt in options:
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
            break
        except OSError:
            continue
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._collector._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self._collector._on_socket_error(exc)


class Collector:
    """The built-in IPFIX/UDP collector; use as ``async with`` or :meth:`start` / :meth:`close`."""

    def __init__(
        self,
        listen: tuple[str, int] = ("127.0.0.1", DEFAULT_PORT),
        *,
        json_lines: bool = False,
        output: TextIO | None = None,
        count_options: bool = True,
        keep: int = 100_000,
        log: Any = None,
        stop_after_records: int | None = None,
        rcvbuf: int = 8 << 20,
        extra_elements: Mapping[tuple[int, int], ElementInfo] | None = None,
        log_limit: int = 20,
        max_sessions: int = 4096,
        max_templates_per_session: int = 4096,
        max_template_fields: int = 512,
        max_template_bytes: int = 16 << 20,
        template_lifetime: float | None = UDP_TEMPLATE_LIFETIME,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.listen = listen
        self.json_lines = json_lines
        self.output = output
        self.decoder = Decoder(
            count_options=count_options,
            extra_elements=extra_elements,
            max_sessions=max_sessions,
            max_templates_per_session=max_templates_per_session,
            max_template_fields=max_template_fields,
            max_template_bytes=max_template_bytes,
            template_lifetime=template_lifetime,
            withdrawals=False,
        )
        self.clock = clock
        self.records: deque[DataRecord] = deque(maxlen=keep)
        self.gaps: deque[SequenceGap] = deque(maxlen=keep)
        self.malformed: deque[Malformed] = deque(maxlen=keep)
        self.datagrams = 0
        self.octets = 0
        self.socket_errors = 0
        self.internal_errors = 0
        self.output_failed = False
        self.stop_after_records = stop_after_records
        self.rcvbuf = rcvbuf
        self.log = log if log is not None else stderr_logger()
        self.log_limit = log_limit
        self.done = asyncio.Event()
        self._changed = asyncio.Event()
        self._logged: Counter[str] = Counter()
        self._transport: asyncio.DatagramTransport | None = None
        self._address: tuple[str, int] | None = None
        self._inode: int | None = None
        self.rcvbuf_effective = 0
        self._format: Callable[[DataRecord], str] = record_json if json_lines else record_text

    @property
    def stats(self) -> DecoderStats:
        return self.decoder.stats

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); still readable after :meth:`close`."""
        if self._address is None:
            raise RuntimeError("collector not started")
        return self._address

    @property
    def port(self) -> int:
        return self.address[1]

    def counters(self) -> dict[str, int]:
        """Flat totals: decoder counters plus datagrams, octets, socket and internal errors.

        ``template_bytes`` is a gauge, what the templates held are charged against the budget.
        ``socket_drops`` (datagrams the kernel dropped on this socket, Linux only) is present
        while the socket is open.
        """
        out = {
            "datagrams": self.datagrams,
            "octets": self.octets,
            **self.decoder.stats.as_dict(),
            "template_bytes": self.decoder.template_bytes,
            "socket_errors": self.socket_errors,
            "internal_errors": self.internal_errors,
        }
        drops = self.socket_drops()
        if drops is not None:
            out["socket_drops"] = drops
        return out

    def socket_drops(self) -> int | None:
        """Receive-buffer overflows the kernel counted for this socket (/proc/net/udp*), if known."""
        if self._transport is None or self._inode is None:
            return None
        inode = str(self._inode)
        for path in ("/proc/net/udp", "/proc/net/udp6"):
            try:
                with open(path) as f:
                    rows = f.read().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                cols = row.split()
                if len(cols) >= 13 and cols[9] == inode:
                    return int(cols[12])
        return None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), local_addr=self.listen)
        self._transport = transport
        sockname = transport.get_extra_info("sockname")
        self._address = (str(sockname[0]), int(sockname[1]))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._inode = os.fstat(sock.fileno()).st_ino
            if self.rcvbuf:
                self.rcvbuf_effective = _set_rcvbuf(sock, self.rcvbuf)
        self.log.info("listening", address=format_exporter(self.address), rcvbuf=self.rcvbuf_effective)

    def _drain_pending(self) -> None:
        """Decode what is still queued in the socket: a stop must not lose data already received."""
        assert self._transport is not None
        sock = self._transport.get_extra_info("socket")
        if sock is None:
            return
        with socket.socket(fileno=os.dup(sock.fileno())) as dup:
            dup.setblocking(False)
            for _ in range(1_000_000):  # bounded: a sender still blasting must not keep us here
                try:
                    data, addr = dup.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                self._on_datagram(data, addr)

    async def close(self) -> None:
        if self._transport is not None:
            self._drain_pending()
            self._transport.close()
            self._transport = None
            await asyncio.sleep(0)

    async def __aenter__(self) -> Collector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_until(self, predicate: Callable[[Collector], bool], timeout: float) -> bool:
        """Wait until ``predicate(self)`` holds after some datagram; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return predicate(self)
        return True

    async def wait_for_records(self, n: int, timeout: float = 5.0) -> bool:
        """Wait until at least ``n`` data records (options included) have been decoded in total."""
        return await self.wait_until(lambda c: c.stats.records >= n, timeout)

    def summary(self) -> dict[str, int]:
        return self.counters()

    def _should_log(self, kind: str, limit: int) -> bool:
        self._logged[kind] += 1
        n = self._logged[kind]
        return n <= limit or n % 1000 == 0

    def _on_datagram(self, data: bytes, addr: Any) -> None:
        self.datagrams += 1
        self.octets += len(data)
        try:
            res = self.decoder.feed(data, format_exporter(addr), now=self.clock())
            self._emit(res)
        except Exception as exc:
            self.internal_errors += 1
            if self._should_log("internal", self.log_limit):
                self.log.exception("internal error decoding datagram", exporter=format_exporter(addr), error=repr(exc))
        if self.stop_after_records is not None and self.stats.records >= self.stop_after_records:
            self.done.set()
        self._changed.set()
        self._changed = asyncio.Event()

    def _emit(self, res: FeedResult) -> None:
        self.records.extend(res.records)
        self.gaps.extend(res.gaps)
        self.malformed.extend(res.malformed)
        if res.records and self.output is not None and not self.output_failed:
            lines = "".join(self._format(r) + "\n" for r in res.records)
            try:
                self.output.write(lines)
                self.output.flush()
            except (OSError, ValueError) as exc:
                self.output_failed = True
                self.log.error("output failed, stopping", error=repr(exc))
                self.done.set()
        for gap in res.gaps:
            if self._should_log("gap", max(self.log_limit, 100)):
                self.log.warning(
                    "sequence gap",
                    exporter=gap.exporter,
                    odid=gap.odid,
                    expected=gap.expected,
                    received=gap.received,
                    delta=gap.delta,
                    total_gaps=self.stats.gaps,
                )
        for bad in res.malformed:
            if self._should_log("malformed:" + bad.reason, self.log_limit):
                self.log.warning(
                    "malformed input",
                    exporter=bad.exporter,
                    odid=bad.odid,
                    reason=bad.reason,
                    detail=bad.detail,
                    total_malformed=self.stats.malformed,
                )
        for hit in res.limits:
            if self._should_log("limit:" + hit.limit, 1):
                self.log.warning(
                    "decoder limit hit",
                    limit=hit.limit,
                    setting=getattr(self.decoder, hit.limit),
                    exporter=hit.exporter,
                    odid=hit.odid,
                    dropped=hit.dropped,
                    counter=hit.counter,
                    total=getattr(self.stats, hit.counter),
                )
        for unk in res.unknown_sets:
            if self._should_log("unknown", self.log_limit):
                self.log.warning(
                    "data set without template",
                    exporter=unk.exporter,
                    odid=unk.odid,
                    template_id=unk.template_id,
                    total_unknown_template_sets=self.stats.unknown_template_sets,
                )

    def _on_socket_error(self, exc: Exception) -> None:
        self.socket_errors += 1
        if self._should_log("socket", self.log_limit):
            self.log.warning("socket error", error=repr(exc))
