"""Send IPFIX messages to collectors.

One long-lived connected UDP socket per collector: the source port stays the
same for the life of the process, which collectors that key template state by
exporter address and port (goflow2, nfacctd) rely on. A send error (ICMP port
unreachable surfaces as ECONNREFUSED on a connected socket, a full buffer as
ENOBUFS) is counted and logged on state change, never fatal: metering goes on
and the next scan tries again.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import structlog

log = structlog.get_logger("xdpflow.transport")

DEFAULT_PORT = 4739
SCHEMES = ("udp",)


class EndpointError(ValueError):
    """A collector address that can't be used; the message says why."""


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_endpoint(text: str, default_port: int = DEFAULT_PORT) -> Endpoint:
    """HOST:PORT, [V6]:PORT, HOST, or SCHEME://HOST:PORT (scheme udp)."""
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
    return Endpoint(parts.scheme, parts.hostname, port if port is not None else default_port)


@dataclass
class SenderStats:
    messages: int = 0
    octets: int = 0
    send_errors: int = 0
    messages_failed: int = 0


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, sender: UdpSender) -> None:
        self.sender = sender

    def error_received(self, exc: Exception) -> None:
        self.sender.note_error(exc)


@dataclass
class UdpSender:
    endpoint: Endpoint
    stats: SenderStats = field(default_factory=SenderStats)
    _transport: asyncio.DatagramTransport | None = None
    _failing: bool = False
    _errors_at_last_send: int = 0

    async def open(self) -> UdpSender:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.endpoint.host, self.endpoint.port, type=socket.SOCK_DGRAM)
        except OSError as e:
            raise EndpointError(f"collector {self.endpoint}: cannot resolve {self.endpoint.host}: {e}") from None
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.connect(addr)
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        self._transport = transport
        return self

    @property
    def local_port(self) -> int:
        assert self._transport is not None
        return int(self._transport.get_extra_info("sockname")[1])

    def note_error(self, exc: BaseException) -> None:
        self.stats.send_errors += 1
        if not self._failing:
            self._failing = True
            log.warning("collector unreachable", collector=str(self.endpoint), error=str(exc))

    def send(self, datagrams: list[bytes]) -> None:
        # ICMP errors arrive after the send that caused them: a whole interval
        # without a new error means the collector is back.
        if self._failing and self.stats.send_errors == self._errors_at_last_send:
            self._failing = False
            log.info("collector reachable again", collector=str(self.endpoint))
        self._errors_at_last_send = self.stats.send_errors
        if self._transport is None or self._transport.is_closing():
            self.stats.messages_failed += len(datagrams)
            return
        for d in datagrams:
            try:
                self._transport.sendto(d)
            except OSError as e:
                self.note_error(e)
                self.stats.messages_failed += 1
                continue
            self.stats.messages += 1
            self.stats.octets += len(d)

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
