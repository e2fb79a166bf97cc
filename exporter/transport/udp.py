"""IPFIX over UDP (RFC 7011 section 10.3): one long-lived connected socket per collector.

The socket lives as long as the process, so the source port stays the same, which collectors
that key template state by exporter address and port (goflow2, nfacctd) rely on. A send error
(ICMP port unreachable surfaces as ECONNREFUSED on a connected socket, a full buffer as ENOBUFS)
is counted and logged on state change, never fatal. A collector given by name is resolved again
every `resolve_every` seconds: when the name moves (a Kubernetes Service, DNS failover) the same
socket is connected to the new address, so the source port still stays; when it stops
resolving, sending goes on to the last address and that is logged once.

While the collector is unreachable every batch starts with the `on_connect` templates, so one
that comes back can decode what reaches it first.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic

import structlog

from exporter.address import ip_version
from exporter.transport.endpoint import Endpoint, EndpointError
from exporter.transport.sender import (
    OnConnect,
    OnNotSent,
    SenderStats,
    Tag,
    record_counts,
    report_not_sent,
    sockname_address,
)

log = structlog.get_logger("xdpflow.transport")


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
class UdpSender(Generic[Tag]):
    endpoint: Endpoint
    on_not_sent: OnNotSent[Tag] | None = None
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

    async def open(self) -> UdpSender[Tag]:
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
        if ip_version(self.endpoint.host) is None:
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
    def local_address(self) -> str | None:
        # Fixed by the socket's connect; a collector name that moves reconnects and calls on_connect,
        # whose owner reads this again.
        if self._sock is None:
            return None
        try:
            return sockname_address(self._sock.getsockname())
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

    def send(self, messages: Sequence[bytes], records: Sequence[int] | None = None,
             tags: Sequence[Tag] | None = None) -> None:
        counts = record_counts(messages, records, tags)
        own = 0  # messages of the sender's own at the head (templates): they have no tag
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
            own = 1
            self.stats.template_messages += 1
        if self._transport is None or self._transport.is_closing():
            self.stats.messages_failed += len(messages)
            self.stats.records_failed += sum(counts)
            report_not_sent(self.on_not_sent, list(tags or ()), self.endpoint)
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
        failed: list[Tag] = []
        for i, e in failures:
            self.note_error(e)
            self.stats.messages_failed += 1
            self.stats.records_failed += counts[i]
            if tags is not None and i >= own:
                failed.append(tags[i - own])
        bad = {i for i, _ in failures}
        self.stats.messages += len(messages) - len(bad)
        self.stats.octets += sum(len(d) for i, d in enumerate(messages) if i not in bad)
        self.stats.records += sum(n for i, n in enumerate(counts) if i not in bad)
        report_not_sent(self.on_not_sent, failed, self.endpoint)

    async def close(self, timeout: float | None = None) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
            self._resolver = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            self._sock = None


