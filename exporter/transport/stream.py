"""IPFIX over TCP (RFC 7011 section 10.4): one persistent connection, a bounded queue, reconnects.

The connection is owned by a background task. `send()` only appends to a bounded queue (in
messages and in bytes) and wakes the task. The task resolves the name, connects, writes the
`on_connect(first)` bytes first (the templates: every connection is a new transport session that
must learn them again), then the queue, messages back to back: an IPFIX message delimits itself
by its header's length field. Writing stops at the transport's high-water mark until it drains,
so a collector that accepts but never reads costs at most the queue, one write buffer and the
kernel's socket buffer. Broken connections are retried with exponential backoff and full jitter:
the n-th retry waits uniform [0, min(backoff_max, backoff_initial * 2^n)); the count restarts
once a connection has stayed up `stable_after` seconds.

Overflow drops the OLDEST queued messages: fresh flows are worth more to whoever watches the
collector than stale ones, the queue stays a window over the most recent export, and either
choice leaves the same gap in sequence numbers. Each dropped message and its records are counted.
A message counts as sent once handed to the connection; what the kernel or the transport buffer
still held when a connection broke is lost unseen (IPFIX over TCP has no acknowledgement).

`on_connect(first)` is given the message that will follow the templates (None when nothing is
queued): queued messages were encoded earlier than the templates, so the caller (the encoder,
Encoder.templates_message) gives the templates that message's export time and sequence number.
The transport never reads or writes an IPFIX header itself.

TLS (tls.py) is this sender with `prepare()` building a context and `tls_client()` returning it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Self, cast

import structlog

from exporter.transport.endpoint import Endpoint, EndpointError, TransportSettingsError
from exporter.transport.sender import (
    OnConnect,
    OnNotSent,
    SenderStats,
    Tag,
    describe_error,
    record_counts,
    report_not_sent,
    sockname_address,
)

log = structlog.get_logger("xdpflow.transport")

WRITE_BATCH = 64 << 10

# A queued message: its bytes, then its records and where its tag is (the caller's tags, the
# index there), so a tag is looked up only for a message that is not delivered.
Queued = tuple[bytes, tuple[int, Sequence[Tag] | None, int]]


def backoff_delay(attempt: int, initial: float = 0.5, maximum: float = 30.0,
                  rng: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(maximum, initial * 2**attempt)); `attempt` counts from 0."""
    cap = min(maximum, initial * 2.0 ** min(attempt, 64))
    return cap * rng()


@dataclass(frozen=True)
class StreamOptions:
    """Queue bound, reconnect schedule and socket settings of a TCP or TLS sender."""

    queue_messages: int = 65_536
    queue_bytes: int = 32 << 20
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    stable_after: float = 10.0  # a connection up this long restarts the backoff schedule
    # A connection that ends sooner than this, for the same reason as the last one, is a flap:
    # logged at debug so a collector that accepts then hangs up at once is one state, not many.
    flap_window: float = 2.0
    connect_timeout: float = 10.0  # TCP connect, then again for the TLS handshake
    flush_timeout: float = 5.0  # close() waits this long for the queue to drain
    write_high_water: int = 256 << 10
    # The kernel aborts a connection whose data stays unacknowledged this long (TCP_USER_TIMEOUT):
    # a collector host that vanished is noticed in a minute, not after ~15 of retransmissions.
    user_timeout: float | None = 60.0
    sndbuf: int | None = None  # SO_SNDBUF; None leaves the kernel's autotuning

    def __post_init__(self) -> None:
        if self.queue_messages < 1 or self.queue_bytes < 1:
            raise TransportSettingsError("send queue bounds must be at least 1 message and 1 byte")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise TransportSettingsError(
                f"backoff: need 0 < initial ({self.backoff_initial}) <= max ({self.backoff_max})")
        if self.connect_timeout <= 0 or self.flush_timeout < 0 or self.write_high_water < 1:
            raise TransportSettingsError(
                "connect_timeout > 0, flush_timeout >= 0 and write_high_water >= 1 are required")


class _Link(asyncio.Protocol):
    """One connection's events, for the sender's task. A collector has nothing to say: reads are dropped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, kick: Callable[[], None]) -> None:
        self.kick = kick
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[BaseException | None] = loop.create_future()
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.kick()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        self.kick()

    @property
    def buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0


def tags_of(entries: Iterable[Queued[Tag]]) -> list[Tag]:
    """The tags of queued messages, in order; untagged ones have none."""
    return [tags[i] for _, (_, tags, i) in entries if tags is not None]


class TcpSender(Generic[Tag]):
    """IPFIX over one persistent TCP connection, with a bounded queue and reconnects (see module doc)."""

    def __init__(self, endpoint: Endpoint, *, on_connect: OnConnect | None = None,
                 on_not_sent: OnNotSent[Tag] | None = None, options: StreamOptions | None = None,
                 rng: Callable[[], float] = random.random) -> None:
        self.endpoint = endpoint
        self.on_connect = on_connect
        self.on_not_sent = on_not_sent
        self.options = options if options is not None else StreamOptions()
        self.stats = SenderStats()
        self._rng = rng
        self._queue: deque[Queued[Tag]] = deque()
        self._queued_bytes = 0
        self._kick = asyncio.Event()
        self._retry_now = asyncio.Event()
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._link: _Link | None = None
        self._closed = False
        self._stopping = False
        self._overflow_logged = False
        self._failure = ""
        self._last_failure = ""
        self._flapping = False
        self._dropped_at_down = 0

    # -- the caller's side --

    async def open(self) -> Self:
        self.prepare()
        loop = asyncio.get_running_loop()
        try:
            await loop.getaddrinfo(self.endpoint.host, self.endpoint.port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise EndpointError(f"collector {self.endpoint}: cannot resolve {self.endpoint.host}: {e}") from None
        self._task = asyncio.create_task(self._run(), name=f"xdpflow-sender {self.endpoint}")
        self._task.add_done_callback(self._task_done)
        return self

    def send(self, messages: Sequence[bytes], records: Sequence[int] | None = None,
             tags: Sequence[Tag] | None = None) -> None:
        counts = record_counts(messages, records, tags)
        if self._closed:
            self.stats.messages_failed += len(messages)
            self.stats.records_failed += sum(counts)
            report_not_sent(self.on_not_sent, list(tags or ()), self.endpoint)
            return
        for i, (m, n) in enumerate(zip(messages, counts, strict=True)):
            self._queue.append((m, (n, tags, i)))
            self._queued_bytes += len(m)
        dropped: list[Queued[Tag]] = []
        limit_messages, limit_bytes = self.options.queue_messages, self.options.queue_bytes
        if len(self._queue) > limit_messages or self._queued_bytes > limit_bytes:
            # Messages without flow records (options totals, which every scan repeats with newer
            # values) go first, the newest one excepted; flow-carrying messages only after that.
            keep_last = max((i for i, (_, (n, _, _)) in enumerate(self._queue) if n == 0), default=-1)
            kept: deque[Queued[Tag]] = deque()
            excess = len(self._queue) - limit_messages
            for i, entry in enumerate(self._queue):
                m, (n, _, _) = entry
                over = excess > 0 or self._queued_bytes > limit_bytes
                if over and n == 0 and i != keep_last:
                    self._queued_bytes -= len(m)
                    self.stats.messages_dropped += 1
                    dropped.append(entry)
                    excess -= 1
                else:
                    kept.append(entry)
            self._queue = kept
        while len(self._queue) > limit_messages or self._queued_bytes > limit_bytes:
            entry = self._queue.popleft()
            self._queued_bytes -= len(entry[0])
            self.stats.messages_dropped += 1
            self.stats.records_dropped += entry[1][0]
            dropped.append(entry)
        if dropped and not self._overflow_logged:
            self._overflow_logged = True
            log.warning("send queue full, dropping oldest messages", collector=str(self.endpoint),
                        connected=self.connected, queue_messages=limit_messages, queue_bytes=limit_bytes)
        report_not_sent(self.on_not_sent, tags_of(dropped), self.endpoint)
        self._kick.set()

    async def close(self, timeout: float | None = None) -> None:
        """Deliver what is queued within `timeout` (default options.flush_timeout), then close.

        Whatever is still queued then is counted as failed.
        """
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.options.flush_timeout if timeout is None else timeout)
        self._retry_now.set()
        while self._task is not None and not self._task.done() and loop.time() < deadline:
            link = self._link
            if not self._queue and (link is None or link.buffered == 0):
                break
            await asyncio.sleep(0.01)
        self._stopping = True
        task, self._task = self._task, None
        # Python 3.11's wait_for can swallow a cancel that races its inner future: insist.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        left = len(self._queue)
        if left:
            self.stats.messages_failed += left
            self.stats.records_failed += sum(n for _, (n, _, _) in self._queue)
            log.warning("closed with messages unsent", collector=str(self.endpoint), messages=left)
            report_not_sent(self.on_not_sent, tags_of(self._queue), self.endpoint)
        self._queue.clear()
        self._queued_bytes = 0
        link, self._link = self._link, None
        self._up.clear()
        if link is not None and link.transport is not None:
            if link.buffered:
                link.transport.abort()
            else:
                link.transport.close()  # FIN, or close_notify first over TLS
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.05, min(1.0, deadline - loop.time()))):
                        await asyncio.shield(link.lost)
                if not link.lost.done():
                    link.transport.abort()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def local_address(self) -> str | None:
        link = self._link
        if link is None or link.transport is None:
            return None
        return sockname_address(link.transport.get_extra_info("sockname"))

    @property
    def queue_bytes(self) -> int:
        return self._queued_bytes

    @property
    def connected(self) -> bool:
        return self._link is not None and not self._link.lost.done()

    async def wait_connected(self, timeout: float) -> bool:
        """True once a connection is up, False after `timeout` seconds without one."""
        try:
            async with asyncio.timeout(timeout):
                await self._up.wait()
        except TimeoutError:
            return False
        return True

    # -- the connection task --

    def prepare(self) -> None:
        """Check settings that must fail at open(); TLS builds its context here."""

    def tls_client(self) -> tuple[ssl.SSLContext, str] | None:
        """The context and expected server name when connections are TLS."""
        return None

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("sender task failed", collector=str(self.endpoint), error=describe_error(task.exception()))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        opts = self.options
        attempt = 0
        while not self._stopping:
            link = await self._connect()
            if link is not None:
                up_at = loop.time()
                reason = await self._pump(link)
                self._link = None
                self._up.clear()
                self.stats.send_errors += 1
                self._dropped_at_down = self.stats.messages_dropped
                self._overflow_logged = False
                lasted = loop.time() - up_at
                stable = lasted >= opts.stable_after
                if stable:
                    attempt = 0
                    self._last_failure = ""
                delay = backoff_delay(attempt, opts.backoff_initial, opts.backoff_max, self._rng)
                key = f"disconnected: {reason}"
                self._flapping = lasted < opts.flap_window and key == self._last_failure
                self._last_failure = key
                (log.debug if self._flapping else log.warning)(
                    "collector disconnected", collector=str(self.endpoint), reason=reason,
                    queued=len(self._queue), retry_in=round(delay, 3))
            else:
                self._flapping = False
                delay = backoff_delay(attempt, opts.backoff_initial, opts.backoff_max, self._rng)
                self._log_failure(attempt, delay)
            attempt += 1
            self._retry_now.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._retry_now.wait()

    def _fail(self, kind: str, exc: BaseException | None) -> None:
        self.stats.connect_failures += 1
        self.stats.send_errors += 1
        if kind == "tls handshake":
            self.stats.handshake_failures += 1
        self._failure = f"{kind}: {describe_error(exc)}"

    def _log_failure(self, attempt: int, delay: float) -> None:
        reason = self._failure
        event = "tls handshake failed" if reason.startswith("tls handshake") else "collector unreachable"
        fields = {"collector": str(self.endpoint), "reason": reason, "retry_in": round(delay, 3),
                  "attempt": attempt + 1, "queued": len(self._queue)}
        # One line per change of state; the same failure again only at debug level.
        if reason != self._last_failure:
            log.warning(event, **fields)
        else:
            log.debug("reconnecting", **fields)
        self._last_failure = reason

    def _tune(self, sock: socket.socket) -> None:
        opts = self.options
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if opts.sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, opts.sndbuf)
        if opts.user_timeout is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(opts.user_timeout * 1000))
            for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
                if hasattr(socket, name):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)

    async def _connect(self) -> _Link | None:
        loop = asyncio.get_running_loop()
        timeout = self.options.connect_timeout
        try:
            infos = await loop.getaddrinfo(self.endpoint.host, self.endpoint.port, type=socket.SOCK_STREAM)
        except OSError as e:
            self._fail("resolve", e)
            return None
        sock: socket.socket | None = None
        error: BaseException | None = None
        for family, _, proto, _, addr in infos:
            candidate = socket.socket(family, socket.SOCK_STREAM, proto)
            try:
                candidate.setblocking(False)
                self._tune(candidate)
                async with asyncio.timeout(timeout):
                    await loop.sock_connect(candidate, addr)
            except (OSError, TimeoutError) as e:
                candidate.close()
                error = e
                continue
            except BaseException:
                candidate.close()
                raise
            sock = candidate
            break
        if sock is None:
            self._fail("connect", error)
            return None
        link = _Link(loop, self._kick.set)
        tls = self.tls_client()
        try:
            if tls is None:
                await loop.create_connection(lambda: link, sock=sock)
            else:
                await loop.create_connection(lambda: link, sock=sock, ssl=tls[0], server_hostname=tls[1],
                                             ssl_handshake_timeout=timeout)
        except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
            # No sock.close(): the failed transport owns the socket and closes it (uvloop a moment later).
            self._fail("connect" if tls is None else "tls handshake", e)
            return None
        return link

    async def _pump(self, link: _Link) -> str:
        """Write templates then the queue until the connection is lost; the reason it ended."""
        transport = link.transport
        assert transport is not None
        transport.set_write_buffer_limits(high=self.options.write_high_water)
        self._link = link
        self.stats.connections += 1
        ssl_object = transport.get_extra_info("ssl_object")
        (log.debug if self._flapping else log.info)(
            "collector connected", collector=str(self.endpoint), connection=self.stats.connections,
            queued=len(self._queue), dropped_while_down=self.stats.messages_dropped - self._dropped_at_down,
            **({"tls": ssl_object.version()} if ssl_object is not None else {}))
        self._up.set()
        if self.on_connect is not None:
            try:
                first = self.on_connect(self._queue[0][0] if self._queue else None)
            except Exception as e:
                log.error("on_connect callback failed", collector=str(self.endpoint), error=describe_error(e))
                transport.abort()
                return f"on_connect failed: {describe_error(e)}"
            if first:
                transport.write(first)
                self.stats.messages += 1
                self.stats.octets += len(first)
                self.stats.template_messages += 1
        while not link.lost.done():
            if link.paused or not self._queue:
                self._kick.clear()
                await self._kick.wait()
                continue
            batch: list[bytes] = []
            size = records = 0
            while self._queue and size < WRITE_BATCH:
                m, (n, _, _) = self._queue.popleft()
                batch.append(m)
                size += len(m)
                records += n
            self._queued_bytes -= size
            transport.write(b"".join(batch))
            self.stats.messages += len(batch)
            self.stats.octets += size
            self.stats.records += records
            await asyncio.sleep(0)  # a long queue must not starve the scan loop
        return describe_error(link.lost.result())
