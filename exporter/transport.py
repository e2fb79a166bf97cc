"""Send IPFIX messages to collectors over UDP, TCP or TLS (RFC 7011 sections 10 and 11).

Every sender has the same face (`Sender`): `await open()`, `send(messages, records)`, which never
blocks, `await close()`, which flushes with a bounded wait, `stats`, `queue_depth`, `connected`.
`records[i]` is the number of data records in `messages[i]`; the sender cannot see it in the bytes
without the templates, and needs it to count the flows it failed to deliver (notSentFlowTotalCount
is `stats.records_failed + stats.records_dropped`). Left out, every message counts as 0 records.
For the packets and octets those flows held, an `on_not_sent(messages)` hook receives every
message that was dropped or failed, once, to be decoded by the caller (Encoder.flow_totals).

UDP: one long-lived connected socket per collector, so the source port stays the same for the life
of the process, which collectors that key template state by exporter address and port (goflow2,
nfacctd) rely on. A send error (ICMP port unreachable surfaces as ECONNREFUSED on a connected
socket, a full buffer as ENOBUFS) is counted and logged on state change, never fatal. A collector
given by name is resolved again every `resolve_every` seconds: when the name moves (a Kubernetes
Service, DNS failover) the same socket is connected to the new address, so the source port still
stays; when it stops resolving, sending goes on to the last address and that is logged once.

TCP and TLS: one persistent connection, owned by a background task. `send()` only appends to a
bounded queue (in messages and in bytes) and wakes the task. The task resolves the name, connects,
writes the `on_connect(first)` bytes first (the templates: every connection is a new transport session
that must learn them again), then the queue, messages back to back: an IPFIX message delimits
itself by its header's length field. Writing stops at the transport's high-water mark until it
drains, so a collector that accepts but never reads costs at most the queue, one write buffer and
the kernel's socket buffer. Broken connections are retried with exponential backoff and full
jitter: the n-th retry waits uniform [0, min(backoff_max, backoff_initial * 2^n)); the count
restarts once a connection has stayed up `stable_after` seconds.

Overflow drops the OLDEST queued messages: fresh flows are worth more to whoever watches the
collector than stale ones, the queue stays a window over the most recent export, and either
choice leaves the same gap in sequence numbers. Each dropped message and its records are counted.
A message counts as sent once handed to the connection; what the kernel or the transport buffer
still held when a connection broke is lost unseen (IPFIX over TCP has no acknowledgement).

`on_connect(first)` is given the message that will follow the templates (None when nothing is
queued): queued messages were encoded earlier than the templates, so the caller (the encoder,
Encoder.templates_message) gives the templates that message's export time and sequence number.
The transport never reads or writes an IPFIX header itself.

TLS: TLS 1.2 or later, the server certificate verified against `cafile` (the system store when
none) and its name checked (`server_name`, else the endpoint's host), an optional client
certificate. A handshake failure is counted and retried like a refused connection; nothing is
ever written outside TLS. Unusable files are a one-line TransportSettingsError at `open()`. Under
TLS 1.3 a collector refuses the exporter's certificate only after the exporter's side of the handshake is
done: that shows as connections the collector closes at once, and what was written to them is lost.

Default ports: 4739 for udp and tcp, 4740 for tls: RFC 7011 section 10 has the collector listen
on 4739, and on 4740 for secure connections (IANA "ipfix" and "ipfixs").
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import random
import socket
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, Self, cast
from urllib.parse import urlsplit

import structlog

log = structlog.get_logger("xdpflow.transport")

DEFAULT_PORT = 4739
DEFAULT_TLS_PORT = 4740
DEFAULT_PORTS = {"udp": DEFAULT_PORT, "tcp": DEFAULT_PORT, "tls": DEFAULT_TLS_PORT}
SCHEMES = tuple(DEFAULT_PORTS)

WRITE_BATCH = 64 << 10

OnConnect = Callable[[bytes | None], bytes]   # (the message that will follow) -> templates
OnNotSent = Callable[[Sequence[bytes]], None]


class EndpointError(ValueError):
    """A collector address that can't be used; the message says why."""


class TransportSettingsError(EndpointError):
    """Transport settings or TLS files that can't be used; the message says why, on one line."""


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_endpoint(text: str, default_port: int | None = None) -> Endpoint:
    """HOST:PORT, [V6]:PORT, HOST, or SCHEME://HOST[:PORT] with scheme udp, tcp or tls (bare = udp)."""
    raw = text.strip()
    if not raw:
        raise EndpointError("empty collector address")
    url = raw if "://" in raw else f"udp://{raw}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise EndpointError(f"collector {text!r}: {e}") from None
    if parts.scheme not in SCHEMES:
        raise EndpointError(f"collector {text!r}: transport {parts.scheme!r} is not supported "
                            f"(use {', '.join(SCHEMES)})")
    if not parts.hostname:
        raise EndpointError(f"collector {text!r}: no host")
    if parts.path not in ("", "/") or parts.query:
        raise EndpointError(f"collector {text!r}: unexpected path or query")
    if port is None:
        port = default_port if default_port is not None else DEFAULT_PORTS[parts.scheme]
    return Endpoint(parts.scheme, parts.hostname, port)


@dataclass
class SenderStats:
    """Counters since open(). messages / octets include the on_connect (template) messages."""

    messages: int = 0  # written to the socket
    octets: int = 0
    records: int = 0  # data records in the messages written, as the caller declared them
    send_errors: int = 0  # failed sends, connects, handshakes; connections lost
    messages_failed: int = 0  # could not be sent: send error, sender closed, left over at close
    records_failed: int = 0
    messages_dropped: int = 0  # pushed out of a full queue
    records_dropped: int = 0
    connections: int = 0  # connections made (UDP: 1 at open)
    connect_failures: int = 0  # resolve or connect attempts that failed, handshakes included
    handshake_failures: int = 0  # TLS only
    template_messages: int = 0  # on_connect messages written
    refusals: int = 0  # UDP: ICMP refusals seen (ECONNREFUSED); each belongs to an earlier datagram

    @property
    def records_not_sent(self) -> int:
        """What notSentFlowTotalCount should report for this collector."""
        return self.records_failed + self.records_dropped


class Sender(Protocol):
    endpoint: Endpoint
    stats: SenderStats

    async def open(self) -> Sender: ...

    def send(self, messages: Sequence[bytes], records: Sequence[int] | None = None) -> None: ...

    async def close(self, timeout: float | None = None) -> None: ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def connected(self) -> bool: ...

    @property
    def local_address(self) -> str | None:
        """The source address of the session (exporterIPv4/IPv6Address), None while not connected."""
        ...


def _sockname_address(name: object) -> str | None:
    if isinstance(name, tuple) and name and isinstance(name[0], str):
        return name[0].partition("%")[0]  # an IPv6 link-local address names its scope
    return None


def _record_counts(messages: Sequence[bytes], records: Sequence[int] | None) -> Sequence[int]:
    if records is None:
        return [0] * len(messages)
    if len(records) != len(messages):
        raise ValueError(f"{len(messages)} messages but {len(records)} record counts")
    return records


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "closed by collector"
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's own text ("Connect call failed") hides the cause
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _report_not_sent(hook: OnNotSent | None, messages: Sequence[bytes], endpoint: Endpoint) -> None:
    if hook is None or not messages:
        return
    try:
        hook(messages)
    except Exception as e:  # accounting must not take the sender down with it
        log.error("on_not_sent hook failed", collector=str(endpoint), error=_describe(e))


def backoff_delay(attempt: int, initial: float = 0.5, maximum: float = 30.0,
                  rng: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(maximum, initial * 2**attempt)); `attempt` counts from 0."""
    cap = min(maximum, initial * 2.0 ** min(attempt, 64))
    return cap * rng()


# -- UDP -----------------------------------------------------------------------------------------


class _DatagramProtocol(asyncio.DatagramProtocol):
    def __init__(self, sender: UdpSender) -> None:
        self.sender = sender

    def error_received(self, exc: Exception) -> None:
        self.sender.note_error(exc)


def send_datagrams(sock: socket.socket, datagrams: Sequence[bytes], segment: bool = True,
                   refused: list[int] | None = None) -> list[tuple[int, OSError]]:
    """Send each datagram on a connected, non-blocking socket; (index, error) of each that failed.

    ECONNREFUSED on a connected UDP socket is the ICMP answer to an earlier datagram, reported on
    the next send, which the kernel then refuses whole: that datagram is sent again, once, and
    fails only if the retry does; `refused` collects the index of each such refusal.

    With the compiled core built and `segment`, runs of equal-length datagrams go as one UDP GSO
    send each (the kernel cuts them into the same datagrams); a refusal is reported for the
    datagram a plain send would have reported it for, and the rest go one a send, so against a
    collector that answers with ICMP errors every other one is seen refused, as with plain sends.
    """
    from exporter import core

    failures: list[tuple[int, OSError]] = []
    if core.available():
        batch = datagrams if isinstance(datagrams, list) else list(datagrams)
        start = 0
        while start < len(batch):
            nxt, err = core.module().send(sock.fileno(), batch, start, segment)
            if nxt >= len(batch):
                break
            segment = False   # refused once: the rest one a send, so each refusal is seen
            if err == errno.ECONNREFUSED:
                if refused is not None:
                    refused.append(nxt)
                again, err = core.module().send(sock.fileno(), batch[nxt:nxt + 1], 0, False)
                if again:
                    start = nxt + 1
                    continue
            failures.append((nxt, OSError(err, os.strerror(err))))
            start = nxt + 1
        return failures
    for i, d in enumerate(datagrams):
        try:
            sock.send(d)
        except ConnectionRefusedError as e:
            if refused is not None:
                refused.append(i)
            try:
                sock.send(d)
            except OSError:
                failures.append((i, e))
        except OSError as e:
            failures.append((i, e))
    return failures


@dataclass
class UdpSender:
    endpoint: Endpoint
    on_not_sent: OnNotSent | None = None
    on_connect: OnConnect | None = None  # the templates: sent ahead of every batch while the collector is away
    stats: SenderStats = field(default_factory=SenderStats)
    _transport: asyncio.DatagramTransport | None = None
    _sock: socket.socket | None = None
    _failing: bool = False
    _errors_at_last_send: int = 0
    resolve_every: float = 60.0  # seconds between resolutions of a collector given by name
    _addr: tuple[object, ...] = ()
    _resolver: asyncio.Task[None] | None = None
    _unresolved: bool = False

    async def _resolve(self) -> list[tuple[int, tuple[object, ...]]]:
        """(family, sockaddr) of each address of the collector's name."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.endpoint.host, self.endpoint.port, type=socket.SOCK_DGRAM)
        return [(int(family), tuple(addr)) for family, _, _, _, addr in infos]

    async def open(self) -> UdpSender:
        loop = asyncio.get_running_loop()
        try:
            family, addr = (await self._resolve())[0]
        except OSError as e:
            raise EndpointError(f"collector {self.endpoint}: cannot resolve {self.endpoint.host}: {e}") from None
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.connect(addr)
        transport, _ = await loop.create_datagram_endpoint(lambda: _DatagramProtocol(self), sock=sock)
        self._transport = transport
        self._sock = sock
        self._addr = addr
        self.stats.connections += 1
        if not _is_address(self.endpoint.host):
            self._resolver = loop.create_task(self._follow_name())
        return self

    async def _follow_name(self) -> None:
        while True:
            await asyncio.sleep(self.resolve_every)
            await self.resolve_again()

    async def resolve_again(self) -> None:
        """Resolve the name once more; connect the socket to a new address of the same family."""
        try:
            found = await self._resolve()
        except OSError as e:
            if not self._unresolved:
                self._unresolved = True
                log.warning("collector name no longer resolves, sending to its last address",
                            collector=str(self.endpoint), address=str(self._addr[0]), error=str(e))
            return
        if self._unresolved:
            self._unresolved = False
            log.info("collector name resolves again", collector=str(self.endpoint))
        sock = self._sock
        if sock is None or any(addr == self._addr for _, addr in found):
            return
        same_family = [addr for family, addr in found if family == sock.family]
        if not same_family:
            log.warning("collector name moved to another address family, sending to its last address",
                        collector=str(self.endpoint), address=str(self._addr[0]))
            return
        try:
            sock.connect(same_family[0])  # the socket keeps its local port
        except OSError as e:
            log.warning("collector address changed but cannot be reached, sending to its last address",
                        collector=str(self.endpoint), address=str(same_family[0][0]), error=str(e))
            return
        old, self._addr = self._addr, same_family[0]
        log.info("collector address changed", collector=str(self.endpoint), old=str(old[0]),
                 new=str(self._addr[0]))
        if self.on_connect is not None:
            # Another collector (or another instance of it): it has never seen our templates.
            self.send([self.on_connect(None)], [0])
            self.stats.template_messages += 1

    @property
    def local_port(self) -> int:
        assert self._transport is not None
        return int(self._transport.get_extra_info("sockname")[1])

    @property
    def local_address(self) -> str | None:
        # Fixed by the socket's connect; a collector name that moves reconnects and calls on_connect,
        # whose owner reads this again.
        if self._sock is None:
            return None
        try:
            return _sockname_address(self._sock.getsockname())
        except OSError:
            return None

    @property
    def queue_depth(self) -> int:
        return 0

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._failing

    def note_error(self, exc: BaseException) -> None:
        self.stats.send_errors += 1
        if not self._failing:
            self._failing = True
            log.warning("collector unreachable", collector=str(self.endpoint), error=str(exc))

    def send(self, messages: Sequence[bytes], records: Sequence[int] | None = None) -> None:
        counts = _record_counts(messages, records)
        # ICMP errors arrive after the send that caused them: a whole interval
        # without a new error means the collector is back.
        if self._failing and self.stats.send_errors == self._errors_at_last_send:
            self._failing = False
            log.info("collector reachable again", collector=str(self.endpoint))
        self._errors_at_last_send = self.stats.send_errors
        if self._failing and self.on_connect is not None and messages:
            # A collector that comes back knows no templates: whatever reaches it first must carry them.
            messages = [self.on_connect(messages[0]), *messages]
            counts = [0, *counts]
            self.stats.template_messages += 1
        if self._transport is None or self._transport.is_closing():
            self.stats.messages_failed += len(messages)
            self.stats.records_failed += sum(counts)
            _report_not_sent(self.on_not_sent, messages, self.endpoint)
            return
        assert self._sock is not None
        # Straight on the socket, not through the transport: after an ICMP port unreachable
        # the kernel refuses the next send (ECONNREFUSED) and transmits nothing; the
        # transport would report that through a callback and the message would count as sent.
        # Segmented sends only while the collector answers: once it refuses, one send a datagram.
        refused: list[int] = []
        failures = send_datagrams(self._sock, messages, segment=not self._failing, refused=refused)
        for _ in refused:
            self.stats.refusals += 1
            self.note_error(ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED)))
        failed: list[bytes] = []
        for i, e in failures:
            self.note_error(e)
            self.stats.messages_failed += 1
            self.stats.records_failed += counts[i]
            failed.append(messages[i])
        bad = {i for i, _ in failures}
        self.stats.messages += len(messages) - len(bad)
        self.stats.octets += sum(len(d) for i, d in enumerate(messages) if i not in bad)
        self.stats.records += sum(n for i, n in enumerate(counts) if i not in bad)
        _report_not_sent(self.on_not_sent, failed, self.endpoint)

    async def close(self, timeout: float | None = None) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
            self._resolver = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            self._sock = None


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# -- TCP and TLS ---------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class TlsOptions:
    cafile: str | None = None  # None: the system's trusted CAs
    certfile: str | None = None  # client certificate (PEM), for collectors that authenticate exporters
    keyfile: str | None = None  # its key, unless it is in certfile; unencrypted
    server_name: str | None = None  # name expected in the collector's certificate; default: the host


def _readable(path: str, what: str, where: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise TransportSettingsError(f"{where}: {what} {path}: {e.strerror or e}") from None


def _no_passphrase() -> bytes:
    raise TransportSettingsError("the key is encrypted; give an unencrypted key")


def make_tls_context(tls: TlsOptions, where: str = "tls") -> ssl.SSLContext:
    """A client context: TLS 1.2+, certificate and name verified. TransportSettingsError on unusable files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cafile is not None:
        _readable(tls.cafile, "CA file", where)
        try:
            ctx.load_verify_locations(cafile=tls.cafile)
        except (ssl.SSLError, OSError) as e:
            raise TransportSettingsError(f"{where}: CA file {tls.cafile}: {_describe(e)}") from None
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.keyfile is not None and tls.certfile is None:
        raise TransportSettingsError(f"{where}: a client key needs a client certificate")
    if tls.certfile is not None:
        _readable(tls.certfile, "client certificate", where)
        if tls.keyfile is not None:
            _readable(tls.keyfile, "client key", where)
        try:
            ctx.load_cert_chain(tls.certfile, tls.keyfile, password=_no_passphrase)
        except TransportSettingsError as e:
            raise TransportSettingsError(f"{where}: client key {tls.keyfile or tls.certfile}: {e}") from None
        except (ssl.SSLError, OSError) as e:
            raise TransportSettingsError(f"{where}: client certificate {tls.certfile}: {_describe(e)}") from None
    return ctx


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


class TcpSender:
    """IPFIX over one persistent TCP connection, with a bounded queue and reconnects (see module doc)."""

    def __init__(self, endpoint: Endpoint, *, on_connect: OnConnect | None = None,
                 on_not_sent: OnNotSent | None = None, options: StreamOptions | None = None,
                 rng: Callable[[], float] = random.random) -> None:
        self.endpoint = endpoint
        self.on_connect = on_connect
        self.on_not_sent = on_not_sent
        self.options = options if options is not None else StreamOptions()
        self.stats = SenderStats()
        self._rng = rng
        self._queue: deque[tuple[bytes, int]] = deque()
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
        self._prepare()
        loop = asyncio.get_running_loop()
        try:
            await loop.getaddrinfo(self.endpoint.host, self.endpoint.port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise EndpointError(f"collector {self.endpoint}: cannot resolve {self.endpoint.host}: {e}") from None
        self._task = asyncio.create_task(self._run(), name=f"xdpflow-sender {self.endpoint}")
        self._task.add_done_callback(self._task_done)
        return self

    def send(self, messages: Sequence[bytes], records: Sequence[int] | None = None) -> None:
        counts = _record_counts(messages, records)
        if self._closed:
            self.stats.messages_failed += len(messages)
            self.stats.records_failed += sum(counts)
            _report_not_sent(self.on_not_sent, messages, self.endpoint)
            return
        for m, n in zip(messages, counts, strict=True):
            self._queue.append((m, n))
            self._queued_bytes += len(m)
        dropped: list[bytes] = []
        limit_messages, limit_bytes = self.options.queue_messages, self.options.queue_bytes
        if len(self._queue) > limit_messages or self._queued_bytes > limit_bytes:
            # Messages without flow records (options totals, which every scan repeats with newer
            # values) go first, the newest one excepted; flow-carrying messages only after that.
            keep_last = max((i for i, (_, n) in enumerate(self._queue) if n == 0), default=-1)
            kept: deque[tuple[bytes, int]] = deque()
            excess = len(self._queue) - limit_messages
            for i, (m, n) in enumerate(self._queue):
                over = excess > 0 or self._queued_bytes > limit_bytes
                if over and n == 0 and i != keep_last:
                    self._queued_bytes -= len(m)
                    self.stats.messages_dropped += 1
                    dropped.append(m)
                    excess -= 1
                else:
                    kept.append((m, n))
            self._queue = kept
        while len(self._queue) > limit_messages or self._queued_bytes > limit_bytes:
            m, n = self._queue.popleft()
            self._queued_bytes -= len(m)
            self.stats.messages_dropped += 1
            self.stats.records_dropped += n
            dropped.append(m)
        if dropped and not self._overflow_logged:
            self._overflow_logged = True
            log.warning("send queue full, dropping oldest messages", collector=str(self.endpoint),
                        connected=self.connected, queue_messages=limit_messages, queue_bytes=limit_bytes)
        _report_not_sent(self.on_not_sent, dropped, self.endpoint)
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
            self.stats.records_failed += sum(n for _, n in self._queue)
            log.warning("closed with messages unsent", collector=str(self.endpoint), messages=left)
            _report_not_sent(self.on_not_sent, [m for m, _ in self._queue], self.endpoint)
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
        return _sockname_address(link.transport.get_extra_info("sockname"))

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

    def _prepare(self) -> None:
        """Check settings that must fail at open(); TLS builds its context here."""

    def _tls(self) -> tuple[ssl.SSLContext, str] | None:
        """The context and expected server name when connections are TLS."""
        return None

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("sender task failed", collector=str(self.endpoint), error=_describe(task.exception()))

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
        self._failure = f"{kind}: {_describe(exc)}"

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
        tls = self._tls()
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
                log.error("on_connect callback failed", collector=str(self.endpoint), error=_describe(e))
                transport.abort()
                return f"on_connect failed: {_describe(e)}"
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
                m, n = self._queue.popleft()
                batch.append(m)
                size += len(m)
                records += n
            self._queued_bytes -= size
            transport.write(b"".join(batch))
            self.stats.messages += len(batch)
            self.stats.octets += size
            self.stats.records += records
            await asyncio.sleep(0)  # a long queue must not starve the scan loop
        return _describe(link.lost.result())


class TlsSender(TcpSender):
    """IPFIX over TLS over TCP (RFC 7011 section 11): TcpSender whose connections are TLS."""

    def __init__(self, endpoint: Endpoint, *, tls: TlsOptions | None = None, on_connect: OnConnect | None = None,
                 on_not_sent: OnNotSent | None = None, options: StreamOptions | None = None,
                 rng: Callable[[], float] = random.random) -> None:
        super().__init__(endpoint, on_connect=on_connect, on_not_sent=on_not_sent, options=options, rng=rng)
        self.tls = tls if tls is not None else TlsOptions()
        self._context: ssl.SSLContext | None = None

    def _prepare(self) -> None:
        self._context = make_tls_context(self.tls, f"collector {self.endpoint}")

    def _tls(self) -> tuple[ssl.SSLContext, str] | None:
        assert self._context is not None
        return self._context, self.tls.server_name or self.endpoint.host


def make_sender(endpoint: Endpoint, *, on_connect: OnConnect | None = None, on_not_sent: OnNotSent | None = None,
                options: StreamOptions | None = None, tls: TlsOptions | None = None) -> Sender:
    """The sender for `endpoint`'s scheme. UDP sends on_connect() ahead of each batch while the collector
    is unreachable (so one that comes back can decode what reaches it first; otherwise its encoder
    refreshes templates by time) and ignores options; only a tls:// endpoint uses `tls`."""
    if endpoint.scheme == "udp":
        return UdpSender(endpoint, on_not_sent=on_not_sent, on_connect=on_connect)
    if endpoint.scheme == "tcp":
        return TcpSender(endpoint, on_connect=on_connect, on_not_sent=on_not_sent, options=options)
    if endpoint.scheme == "tls":
        return TlsSender(endpoint, tls=tls, on_connect=on_connect, on_not_sent=on_not_sent, options=options)
    raise EndpointError(f"collector {endpoint}: transport {endpoint.scheme!r} is not supported")
