"""TCP and TLS senders against collectors on 127.0.0.1, under asyncio and uvloop.

The collectors here split the byte stream into messages by the IPFIX header's length and keep
one list per connection, so order, loss, duplication and what opened each connection are all
visible. Outages are real: the listening socket and every connection are torn down (RST) and a
new server is bound to the same port. TLS certificates (a throwaway CA, a server and a client
certificate) are made per test session with the openssl CLI in a temporary directory.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
import uvloop
from structlog.testing import capture_logs

from exporter.ipfix.encoder import MESSAGE_HEADER as IPFIX_HEADER
from exporter.ipfix.encoder import align_header
from exporter.transport import (
    WRITE_BATCH,
    EndpointError,
    StreamOptions,
    TcpSender,
    TlsOptions,
    TlsSender,
    TransportSettingsError,
    backoff_delay,
    make_tls_context,
    parse_endpoint,
)

LOOPS = ["asyncio", "uvloop"]
EXPORT_TIME = 1_700_000_000
ODID = 7
MARKER = b"PLAINTEXT-IPFIX!"  # in every test payload: must never be seen on the wire under TLS
FAST = StreamOptions(backoff_initial=0.02, backoff_max=0.1, connect_timeout=2.0, flush_timeout=2.0)


def run(loop: str, coro: Coroutine[Any, Any, Any]) -> Any:
    return uvloop.run(coro) if loop == "uvloop" else asyncio.run(coro)


def message(seq: int, size: int = 100, export_time: int = EXPORT_TIME) -> bytes:
    """An IPFIX message of `size` bytes: header + one data set of template 256, payload tagged with seq."""
    payload = (MARKER + seq.to_bytes(4, "big")) * (size // 20 + 1)
    body_len = size - IPFIX_HEADER.size - 4
    return (IPFIX_HEADER.pack(10, size, export_time + seq, seq, ODID)
            + struct.pack("!HH", 256, body_len + 4) + payload[:body_len])


TEMPLATES = IPFIX_HEADER.pack(10, 28, EXPORT_TIME + 10_000, 99_999, ODID) + struct.pack("!HHHHI", 2, 12, 256, 1, 0)


def templates_for(first: bytes | None) -> bytes:
    """The encoder's part of on_connect: templates aligned to the queued message that follows."""
    return TEMPLATES if first is None else align_header(TEMPLATES, first)


def tagged(msgs: list[bytes], records: list[int]) -> tuple[list[bytes], list[int], list[bytes]]:
    """send() arguments with each message its own tag, so on_not_sent hands back the messages themselves."""
    return msgs, records, msgs


def seq_of(msg: bytes) -> int:
    return int(IPFIX_HEADER.unpack_from(msg)[3])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class Collector:
    """An IPFIX-over-TCP (or TLS) collector: one list of messages per connection."""

    def __init__(self, port: int = 0, ssl_ctx: ssl.SSLContext | None = None, read: bool = True,
                 rcvbuf: int | None = None) -> None:
        self.port = port
        self.ssl_ctx = ssl_ctx
        self.read = read
        self.rcvbuf = rcvbuf
        self.connections: list[list[bytes]] = []
        self.clean_eofs = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self._stop = asyncio.Event()

    async def start(self) -> Collector:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf is not None:  # inherited by accepted sockets; also stops receive autotuning
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._handle, sock=sock, ssl=self.ssl_ctx)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn: list[bytes] = []
        self.connections.append(conn)
        self._writers.append(writer)
        if not self.read:
            await self._stop.wait()
            return
        try:
            while True:
                header = await reader.readexactly(IPFIX_HEADER.size)
                length = IPFIX_HEADER.unpack(header)[1]
                conn.append(header + await reader.readexactly(length - IPFIX_HEADER.size))
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                self.clean_eofs += 1
        except (ConnectionError, ssl.SSLError):
            pass

    @property
    def received(self) -> int:
        return sum(len(c) for c in self.connections)

    async def kill(self) -> None:
        """Gone at once: stop listening, reset every connection."""
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        self._stop.set()
        await self._server.wait_closed()


class Tap:
    """A TCP relay that keeps every byte the exporter sent, to look for plaintext on the wire."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.upstream = bytearray()
        self.port = 0

    async def start(self) -> Tap:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: bool) -> None:
            try:
                while data := await src.read(65536):
                    if keep:
                        self.upstream.extend(data)
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w, True), pipe(up_r, writer, False))


class RawServer:
    """Accepts, keeps every byte received, answers nothing, hangs up after `hold` seconds."""

    def __init__(self, hold: float = 0.2) -> None:
        self.hold = hold
        self.data = bytearray()
        self.port = 0
        self.accepted = 0

    async def start(self) -> RawServer:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            async with asyncio.timeout(self.hold):
                while data := await reader.read(65536):
                    self.data.extend(data)
        except (TimeoutError, ConnectionError):
            pass
        writer.close()


def tcp_sender(port: int, options: StreamOptions = FAST, **kw: Any) -> TcpSender:
    return TcpSender(parse_endpoint(f"tcp://127.0.0.1:{port}"), on_connect=templates_for, options=options, **kw)


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    """Keep log events in memory: an in-process CLI test earlier in the session may have left structlog
    printing to a captured stderr that is closed by now."""
    with capture_logs():
        yield


@pytest.fixture
def debug_logs() -> Iterator[None]:
    """Let debug-level events through to capture_logs whatever the session configured before."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        yield
    finally:
        structlog.configure(**saved)


# -- pure parts ----------------------------------------------------------------------------------


def test_backoff_doubles_from_initial_and_caps_at_max() -> None:
    top = [backoff_delay(n, 0.5, 30.0, rng=lambda: 1.0) for n in range(10)]
    assert top == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert [backoff_delay(n, 0.5, 30.0, rng=lambda: 0.0) for n in range(10)] == [0.0] * 10
    assert backoff_delay(10_000, 0.5, 30.0, rng=lambda: 0.999) < 30.0  # no float overflow far out
    assert backoff_delay(3, 0.25, 1.0, rng=lambda: 0.5) == 0.5


def test_backoff_is_full_jitter() -> None:
    import random

    rng = random.Random(7)
    for attempt, cap in ((0, 0.5), (3, 4.0), (9, 30.0)):
        draws = [backoff_delay(attempt, 0.5, 30.0, rng=rng.random) for _ in range(2000)]
        assert all(0.0 <= d < cap for d in draws)
        assert len(set(draws)) > 1900, "delays are not jittered"
        assert 0.45 * cap < sum(draws) / len(draws) < 0.55 * cap  # uniform over [0, cap)
        assert min(draws) < 0.05 * cap and max(draws) > 0.95 * cap


def test_align_header_takes_time_and_sequence_of_the_follower() -> None:
    first = message(41)
    aligned = align_header(TEMPLATES, first)
    assert IPFIX_HEADER.unpack_from(aligned) == (10, 28, EXPORT_TIME + 41, 41, ODID)
    assert aligned[16:] == TEMPLATES[16:]
    other_domain = first[:12] + struct.pack("!I", ODID + 1) + first[16:]
    assert align_header(TEMPLATES, other_domain) == TEMPLATES
    assert align_header(TEMPLATES, b"short") == TEMPLATES
    assert align_header(b"\x00\x09" + TEMPLATES[2:], first) == b"\x00\x09" + TEMPLATES[2:]


def test_queue_bounds_drop_oldest_and_count_exactly() -> None:
    handed_back: list[bytes] = []
    by_count = tcp_sender(1, StreamOptions(queue_messages=10), on_not_sent=handed_back.extend)
    msgs = [message(i) for i in range(25)]
    by_count.send(msgs[:12], [i + 1 for i in range(12)], tags=msgs[:12])
    by_count.send(msgs[12:], [i + 1 for i in range(12, 25)], tags=msgs[12:])
    assert by_count.queue_depth == 10
    assert (by_count.stats.messages_dropped, by_count.stats.records_dropped) == (15, sum(range(1, 16)))
    assert [seq_of(m) for m, _ in by_count._queue] == list(range(15, 25))
    assert handed_back == msgs[:15], "each dropped message goes to on_not_sent once, oldest first"

    by_bytes = tcp_sender(1, StreamOptions(queue_bytes=1000))
    by_bytes.send([message(i, size=300) for i in range(7)], [2] * 7)
    assert by_bytes.queue_depth == 3 and by_bytes.queue_bytes == 900
    assert (by_bytes.stats.messages_dropped, by_bytes.stats.records_not_sent) == (4, 8)
    by_bytes.send([message(99, size=1200)], [9])  # larger than the whole bound: goes, with everything
    assert by_bytes.queue_depth == 0 and by_bytes.queue_bytes == 0
    assert (by_bytes.stats.messages_dropped, by_bytes.stats.records_dropped) == (8, 8 + 6 + 9)


def test_overflow_drops_options_only_messages_before_flows() -> None:
    """Options totals repeat every scan: on overflow they go first (the newest kept), flows after."""
    handed_back: list[bytes] = []
    s = tcp_sender(1, StreamOptions(queue_messages=4), on_not_sent=handed_back.extend)
    s.send(*tagged([message(0)], [7]))                            # flows
    s.send(*tagged([message(i) for i in range(1, 6)], [0] * 5))   # five options-only scans
    assert [seq_of(m) for m, _ in s._queue] == [0, 3, 4, 5]
    assert (s.stats.messages_dropped, s.stats.records_dropped) == (2, 0)
    s.send(*tagged([message(6)], [2]))                            # more flows: options 3 and 4 go, 5 (newest) stays
    assert [seq_of(m) for m, _ in s._queue] == [0, 4, 5, 6]
    assert s.stats.records_dropped == 0, "no flow-carrying message dropped while options-only ones remained"
    s.send(*tagged([message(7)], [1]))
    s.send(*tagged([message(8)], [1]))    # only flows and the newest options left: oldest flows go
    assert s.stats.records_dropped == 7 and seq_of(handed_back[-1]) == 0
    assert [seq_of(m) for m, _ in s._queue] == [5, 6, 7, 8]


def test_a_failing_not_sent_hook_does_not_break_the_sender() -> None:
    def hook(_: Any) -> None:
        raise RuntimeError("boom")

    sender = tcp_sender(1, StreamOptions(queue_messages=1), on_not_sent=hook)
    with capture_logs() as logs:
        sender.send(*tagged([message(0), message(1)], [1, 1]))
        sender.send(*tagged([message(2)], [1]))
    assert sender.queue_depth == 1 and sender.stats.messages_dropped == 2
    assert [e["event"] for e in logs].count("on_not_sent hook failed") == 2


def test_bad_stream_options_are_config_errors() -> None:
    for kw in ({"queue_messages": 0}, {"backoff_initial": 0.0}, {"backoff_initial": 5.0, "backoff_max": 1.0},
               {"connect_timeout": 0.0}):
        with pytest.raises(TransportSettingsError):
            StreamOptions(**kw)


# -- TCP -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_tcp_delivers_in_order_with_templates_first(loop: str) -> None:
    msgs = [message(i, size=40 + (i * 37) % 1400) for i in range(3000)]

    async def go() -> tuple[Collector, TcpSender]:
        col = await Collector().start()
        sender = await tcp_sender(col.port).open()
        assert await sender.wait_connected(2)
        for i in range(0, len(msgs), 250):
            sender.send(msgs[i:i + 250], [2] * len(msgs[i:i + 250]))
        await until(lambda: col.received == len(msgs) + 1, "every message")
        await sender.close()
        await until(lambda: col.clean_eofs == 1, "a clean close")
        await col.kill()
        return col, sender

    col, sender = run(loop, go())
    assert len(col.connections) == 1
    assert col.connections[0] == [TEMPLATES, *msgs]
    s = sender.stats
    assert (s.messages, s.template_messages, s.records, s.connections) == (3001, 1, 6000, 1)
    assert s.octets == len(TEMPLATES) + sum(map(len, msgs))
    assert (s.messages_dropped, s.messages_failed, s.send_errors) == (0, 0, 0)


@pytest.mark.parametrize("loop", LOOPS)
def test_collector_down_at_start_then_up(loop: str) -> None:
    port = free_port()
    msgs = [message(i) for i in range(50)]

    async def go() -> tuple[Collector, TcpSender, int]:
        sender = await tcp_sender(port).open()
        sender.send(msgs, [3] * 50)
        await until(lambda: sender.stats.connect_failures >= 3, "failed connects")
        assert not sender.connected and sender.queue_depth == 50 and sender.stats.messages == 0
        queued = sender.queue_depth
        col = await Collector(port).start()
        await until(lambda: col.received == 51, "queued messages after the collector came up")
        await sender.close()
        await col.kill()
        return col, sender, queued

    col, sender, queued = run(loop, go())
    print(f"\ndown at start: queued {queued}, delivered {sender.stats.messages - 1}, "
          f"templates sent {sender.stats.template_messages}, dropped {sender.stats.messages_dropped}")
    assert col.connections == [[align_header(TEMPLATES, msgs[0]), *msgs]]
    assert seq_of(col.connections[0][0]) == 0, "templates must carry the first queued message's sequence"
    assert (sender.stats.messages_dropped, sender.stats.records, sender.stats.connections) == (0, 150, 1)


@pytest.mark.parametrize("loop", LOOPS)
def test_collector_restart_midstream(loop: str) -> None:
    before = [message(i) for i in range(100)]
    during = [message(i) for i in range(100, 200)]

    async def go() -> tuple[Collector, Collector, TcpSender]:
        first = await Collector().start()
        sender = await tcp_sender(first.port).open()
        assert await sender.wait_connected(2)
        sender.send(before, [1] * 100)
        await until(lambda: first.received == 101, "the first batch")
        await first.kill()
        await until(lambda: not sender.connected, "the sender to notice")
        sender.send(during, [1] * 100)
        assert sender.queue_depth == 100
        second = await Collector(first.port).start()
        await until(lambda: second.received == 101, "the queue on the new connection")
        await sender.close()
        await second.kill()
        return first, second, sender

    first, second, sender = run(loop, go())
    s = sender.stats
    print(f"\nrestart: queued {len(during)}, delivered after reconnect {second.received - 1}, "
          f"connections {s.connections}, templates sent {s.template_messages}, dropped {s.messages_dropped}")
    assert first.connections == [[TEMPLATES, *before]]
    assert second.connections == [[align_header(TEMPLATES, during[0]), *during]]
    assert seq_of(second.connections[0][0]) == 100
    assert (s.connections, s.template_messages, s.messages, s.messages_dropped) == (2, 2, 202, 0)


@pytest.mark.parametrize("loop", LOOPS)
def test_overflow_while_down_is_counted_and_the_newest_delivered(loop: str) -> None:
    port = free_port()
    msgs = [message(i) for i in range(25)]
    records = [i + 1 for i in range(25)]

    async def go() -> tuple[Collector, TcpSender, list[MutableMapping[str, Any]]]:
        with capture_logs() as logs:
            sender = await tcp_sender(port, StreamOptions(queue_messages=10, backoff_initial=0.02,
                                                          backoff_max=0.05)).open()
            for i in range(0, 25, 5):
                sender.send(msgs[i:i + 5], records[i:i + 5])
            col = await Collector(port).start()
            await until(lambda: col.received == 11, "the surviving queue")
            await sender.close()
            await col.kill()
        return col, sender, logs

    col, sender, logs = run(loop, go())
    s = sender.stats
    print(f"\noverflow: offered 25, queue bound 10, dropped {s.messages_dropped} messages / "
          f"{s.records_dropped} records, delivered {s.messages - s.template_messages}")
    assert (s.messages_dropped, s.records_dropped, s.records_not_sent) == (15, sum(records[:15]), 120)
    assert col.connections == [[align_header(TEMPLATES, msgs[15]), *msgs[15:]]]
    assert s.records == sum(records[15:])
    overflow = [e for e in logs if e["event"].startswith("send queue full")]
    assert len(overflow) == 1, "overflow is logged once per outage, not per message"


@pytest.mark.parametrize("loop", LOOPS)
def test_collector_that_never_reads(loop: str) -> None:
    bound = 400
    opts = StreamOptions(queue_messages=bound, queue_bytes=1 << 20, write_high_water=64 << 10, sndbuf=64 << 10,
                         backoff_initial=0.02, backoff_max=0.1, flush_timeout=0.2)
    msg = message(1, size=1400)
    rounds, per_round = 60, 200
    handed_back: list[int] = []

    async def go() -> tuple[TcpSender, dict[str, int], list[MutableMapping[str, Any]]]:
        col = await Collector(read=False, rcvbuf=64 << 10).start()
        with capture_logs() as logs:
            sender = await tcp_sender(col.port, opts, on_not_sent=lambda ms: handed_back.append(len(ms))).open()
            assert await sender.wait_connected(2)
            worst = max_depth = max_buffered = 0.0
            for _ in range(rounds):
                t0 = time.perf_counter()
                sender.send(*tagged([msg] * per_round, [2] * per_round))
                worst = max(worst, time.perf_counter() - t0)
                max_depth = max(max_depth, sender.queue_depth)
                assert sender._link is not None
                max_buffered = max(max_buffered, sender._link.buffered)
                await asyncio.sleep(0.002)
            assert sender.connected, "a slow collector is not a dead one"
            depth = sender.queue_depth
            offered = rounds * per_round
            s = sender.stats
            assert offered == s.messages - s.template_messages + s.messages_dropped + depth
            await sender.close()
            await col.kill()
        return sender, {"worst_ms": int(worst * 1000), "max_depth": int(max_depth),
                        "max_buffered": int(max_buffered), "depth_at_close": depth, "offered": offered}, logs

    sender, m, logs = run(loop, go())
    s = sender.stats
    print(f"\nnever reads: offered {m['offered']}, written {s.messages - s.template_messages}, "
          f"dropped {s.messages_dropped}, failed at close {s.messages_failed}, max queue {m['max_depth']}, "
          f"max transport buffer {m['max_buffered']} B, slowest send() {m['worst_ms']} ms")
    assert m["max_depth"] <= bound
    assert m["max_buffered"] <= opts.write_high_water + WRITE_BATCH
    assert m["worst_ms"] < 100
    assert s.messages_dropped > m["offered"] // 2
    assert s.messages - s.template_messages + s.messages_dropped + s.messages_failed == m["offered"]
    assert s.messages_failed == m["depth_at_close"]
    assert s.records + s.records_dropped + s.records_failed == 2 * m["offered"]
    assert sum(handed_back) == s.messages_dropped + s.messages_failed
    assert len([e for e in logs if e["event"].startswith("send queue full")]) == 1


@pytest.mark.parametrize("loop", LOOPS)
def test_close_flushes_then_closes(loop: str) -> None:
    msgs = [message(i, size=1000) for i in range(2000)]

    async def go() -> tuple[Collector, TcpSender]:
        col = await Collector().start()
        sender = await tcp_sender(col.port).open()
        assert await sender.wait_connected(2)
        sender.send(msgs, [1] * len(msgs))
        await sender.close()  # at once: the queue is still full
        sender.send([message(9999)], [4])
        await until(lambda: col.clean_eofs == 1, "a clean close")
        await col.kill()
        return col, sender

    col, sender = run(loop, go())
    assert col.connections == [[TEMPLATES, *msgs]]
    assert (sender.stats.messages_failed, sender.stats.records_failed) == (1, 4)


@pytest.mark.parametrize("loop", LOOPS)
def test_close_with_collector_down_is_bounded_and_counted(loop: str) -> None:
    port = free_port()

    handed_back: list[bytes] = []
    msgs = [message(i) for i in range(30)]

    async def go() -> tuple[TcpSender, float]:
        sender = await tcp_sender(port, StreamOptions(backoff_initial=5.0, backoff_max=5.0),
                                  on_not_sent=handed_back.extend).open()
        sender.send(*tagged(msgs, [2] * 30))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await sender.close(timeout=0.3)
        return sender, time.monotonic() - t0

    sender, took = run(loop, go())
    assert took < 1.0
    assert (sender.stats.messages_failed, sender.stats.records_failed, sender.stats.messages) == (30, 60, 0)
    assert sender.queue_depth == 0 and not sender.connected
    assert handed_back == msgs


@pytest.mark.parametrize("loop", LOOPS)
def test_reconnect_follows_the_backoff_schedule(loop: str, debug_logs: None) -> None:
    port = free_port()

    async def go() -> tuple[TcpSender, list[MutableMapping[str, Any]]]:
        with capture_logs() as logs:
            sender = await tcp_sender(port, StreamOptions(backoff_initial=0.01, backoff_max=0.04),
                                      rng=lambda: 1.0).open()
            await until(lambda: sender.stats.connect_failures >= 6, "six failed connects")
            await sender.close(timeout=0)
        return sender, logs

    _, logs = run(loop, go())
    waits = [e for e in logs if e["event"] in ("collector unreachable", "reconnecting")]
    assert [e["retry_in"] for e in waits[:6]] == [0.01, 0.02, 0.04, 0.04, 0.04, 0.04]
    assert [e["event"] for e in waits[:3]] == ["collector unreachable", "reconnecting", "reconnecting"]
    assert waits[0]["log_level"] == "warning" and waits[1]["log_level"] == "debug"
    assert "refused" in waits[0]["reason"].lower()


@pytest.mark.parametrize("loop", LOOPS)
def test_collector_that_hangs_up_at_once_is_logged_once(loop: str, debug_logs: None) -> None:
    async def go() -> tuple[RawServer, TcpSender, list[MutableMapping[str, Any]]]:
        raw = await RawServer(hold=0).start()
        with capture_logs() as logs:
            sender = await tcp_sender(raw.port).open()
            await until(lambda: sender.stats.connections >= 6, "six short connections")
            await sender.close(timeout=0)
        return raw, sender, logs

    raw, sender, logs = run(loop, go())
    by_level = [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("collector")]
    assert by_level.count(("collector disconnected", "warning")) == 1
    assert by_level.count(("collector connected", "info")) == 2
    assert ("collector disconnected", "debug") in by_level and ("collector connected", "debug") in by_level
    assert sender.stats.template_messages == sender.stats.connections >= 6 and raw.accepted >= 5


@pytest.mark.parametrize("loop", LOOPS)
def test_restarts_of_a_collector_that_served_a_while_are_each_logged(loop: str, debug_logs: None) -> None:
    """Connections that lived past the flap window are real state changes, though shorter than stable_after."""
    async def go() -> tuple[TcpSender, list[MutableMapping[str, Any]]]:
        raw = await RawServer(hold=0.3).start()
        with capture_logs() as logs:
            sender = await tcp_sender(raw.port, StreamOptions(backoff_initial=0.02, backoff_max=0.05,
                                                              flap_window=0.1, stable_after=60)).open()
            await until(lambda: sender.stats.connections >= 3 and sender._link is None, "three connections")
            await sender.close(timeout=0)
        return sender, logs

    sender, logs = run(loop, go())
    levels = {e["log_level"] for e in logs if e["event"] in ("collector disconnected", "collector connected")}
    downs = [e for e in logs if e["event"] == "collector disconnected"]
    assert levels == {"warning", "info"} and len(downs) >= 3 and sender.stats.connections >= 3


def test_send_never_awaits() -> None:
    """send() is plain, synchronous code: callable with no running loop at all."""
    sender = tcp_sender(1)
    sender.send([message(0)], [1])
    assert sender.queue_depth == 1
    assert not asyncio.iscoroutinefunction(sender.send)


# -- TLS -----------------------------------------------------------------------------------------


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A throwaway CA, a server certificate for collector.test and 127.0.0.1, a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not found")
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(d, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=xdpflow test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, san, usage in (("server", "DNS:collector.test,IP:127.0.0.1", "serverAuth"),
                             ("client", "DNS:exporter.test", "clientAuth")):
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                                       f"keyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
                                       "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
        _openssl(d, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    _openssl(d, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-aes256",
             "-pass", "pass:secret", "-out", "encrypted.key")
    (d / "garbage.pem").write_text("not a certificate\n")
    names = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key", "encrypted.key", "garbage.pem")
    return {n.replace(".pem", "").replace(".key", "_key"): str(d / n) for n in names}


def server_context(pki: dict[str, str], require_client: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server"], pki["server_key"])
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki["ca"])
    return ctx


def tls_sender(port: int, tls: TlsOptions, options: StreamOptions = FAST) -> TlsSender:
    return TlsSender(parse_endpoint(f"tls://127.0.0.1:{port}"), tls=tls, on_connect=templates_for,
                     options=options)


@pytest.mark.parametrize("loop", LOOPS)
def test_tls_delivers_with_verification_and_nothing_in_clear(loop: str, pki: dict[str, str]) -> None:
    msgs = [message(i, size=500) for i in range(300)]

    async def go() -> tuple[Collector, Tap, TlsSender, list[MutableMapping[str, Any]]]:
        col = await Collector(ssl_ctx=server_context(pki)).start()
        tap = await Tap(col.port).start()
        with capture_logs() as logs:
            sender = await tls_sender(tap.port, TlsOptions(cafile=pki["ca"], server_name="collector.test")).open()
            assert await sender.wait_connected(3)
            sender.send(msgs, [1] * len(msgs))
            await until(lambda: col.received == len(msgs) + 1, "every message over TLS")
            await sender.close()
        await col.kill()
        return col, tap, sender, logs

    col, tap, sender, logs = run(loop, go())
    assert col.connections == [[TEMPLATES, *msgs]]
    assert tap.upstream[:2] == b"\x16\x03", "the first bytes on the wire are a TLS handshake record"
    assert MARKER not in tap.upstream and TEMPLATES not in tap.upstream
    assert sender.stats.handshake_failures == 0 and sender.stats.connections == 1
    connected = [e for e in logs if e["event"] == "collector connected"]
    assert connected and connected[0]["tls"] in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("loop", LOOPS)
def test_tls_wrong_server_name_fails_counted_logged_no_plaintext(loop: str, pki: dict[str, str],
                                                                  debug_logs: None) -> None:
    async def go() -> tuple[Collector, Tap, TlsSender, list[MutableMapping[str, Any]]]:
        col = await Collector(ssl_ctx=server_context(pki)).start()
        tap = await Tap(col.port).start()
        with capture_logs() as logs:
            sender = await tls_sender(tap.port, TlsOptions(cafile=pki["ca"], server_name="wrong.test")).open()
            sender.send([message(i) for i in range(20)], [1] * 20)
            await until(lambda: sender.stats.handshake_failures >= 3, "handshake failures")
            assert not sender.connected and sender.queue_depth == 20 and sender.stats.messages == 0
            await sender.close(timeout=0)
        await col.kill()
        return col, tap, sender, logs

    col, tap, sender, logs = run(loop, go())
    assert col.received == 0 and sender.stats.connections == 0
    assert sender.stats.handshake_failures == sender.stats.connect_failures
    assert tap.upstream.startswith(b"\x16\x03") and MARKER not in tap.upstream and TEMPLATES not in tap.upstream
    failed = [e for e in logs if e["event"] == "tls handshake failed"]
    assert len(failed) == 1 and failed[0]["log_level"] == "warning", "logged once, as a change of state"
    assert "wrong.test" in failed[0]["reason"] or "mismatch" in failed[0]["reason"].lower()
    assert sender.stats.messages_failed == 20


@pytest.mark.parametrize("loop", LOOPS)
def test_tls_to_a_plaintext_collector_never_falls_back(loop: str, pki: dict[str, str]) -> None:
    async def go() -> tuple[RawServer, TlsSender]:
        raw = await RawServer(hold=0.1).start()
        sender = await tls_sender(raw.port, TlsOptions(cafile=pki["ca"]),
                                  StreamOptions(backoff_initial=0.02, backoff_max=0.05, connect_timeout=0.3)).open()
        sender.send([message(i) for i in range(5)], [1] * 5)
        await until(lambda: sender.stats.handshake_failures >= 2, "failed handshakes", timeout=8)
        await sender.close(timeout=0)
        return raw, sender

    raw, sender = run(loop, go())
    assert raw.accepted >= 2 and sender.stats.connections == 0
    assert raw.data.startswith(b"\x16\x03") and MARKER not in raw.data and TEMPLATES not in raw.data


def test_tls_client_certificate(pki: dict[str, str]) -> None:
    async def go() -> tuple[Collector, TlsSender]:
        col = await Collector(ssl_ctx=server_context(pki, require_client=True)).start()
        sender = await tls_sender(col.port, TlsOptions(cafile=pki["ca"], certfile=pki["client"],
                                                       keyfile=pki["client_key"])).open()
        sender.send([message(1)], [1])
        await until(lambda: col.received == 2, "delivery with a client certificate")
        await sender.close()
        await col.kill()
        return col, sender

    col, sender = run("uvloop", go())
    assert col.connections == [[align_header(TEMPLATES, message(1)), message(1)]]
    assert (sender.stats.connections, sender.stats.handshake_failures) == (1, 0)


def test_tls_file_problems_are_one_line_errors_at_open(pki: dict[str, str], tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-ca.pem")
    cases = [
        (TlsOptions(cafile=missing), f"CA file {missing}: No such file or directory"),
        (TlsOptions(cafile=pki["garbage"]), "CA file"),
        (TlsOptions(cafile=pki["ca"], certfile=str(tmp_path / "nope.pem")), "client certificate"),
        (TlsOptions(cafile=pki["ca"], keyfile=pki["client_key"]), "a client key needs a client certificate"),
        (TlsOptions(cafile=pki["ca"], certfile=pki["client"], keyfile=pki["server_key"]), "client certificate"),
        (TlsOptions(cafile=pki["ca"], certfile=pki["client"], keyfile=pki["encrypted_key"]), "encrypted"),
    ]
    for tls, expected in cases:
        async def go(tls: TlsOptions = tls) -> None:
            await tls_sender(free_port(), tls).open()

        with pytest.raises(TransportSettingsError) as e:
            asyncio.run(go())
        assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert str(e.value).startswith("collector tls://127.0.0.1:")
    assert make_tls_context(TlsOptions(cafile=pki["ca"])).minimum_version == ssl.TLSVersion.TLSv1_2


def test_unresolvable_host_is_a_clear_error_at_open() -> None:
    async def go() -> None:
        await TcpSender(parse_endpoint("tcp://no-such-host.invalid:4739")).open()

    with pytest.raises(EndpointError, match="cannot resolve"):
        asyncio.run(go())

