"""What every sender shares: the `Sender` face, its counters, the callbacks' types, error texts.

The UDP, TCP and TLS senders (udp.py, stream.py, tls.py) each implement `Sender`; the caller
holds one per collector and never needs to know which it has.

A tag (`send(messages, records, tags)`) is the caller's, per message, never looked into: the
senders only hand back, through `report_not_sent`, the tags of messages they did not deliver.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import structlog

from exporter.transport.endpoint import Endpoint

log = structlog.get_logger("xdpflow.transport")

Tag = TypeVar("Tag")
Tag_contra = TypeVar("Tag_contra", contravariant=True)

OnConnect = Callable[[bytes | None], bytes]   # (the message that will follow) -> templates
OnNotSent = Callable[[list[Tag]], None]       # the tags of messages that were not delivered


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


class Sender(Protocol[Tag_contra]):
    endpoint: Endpoint
    stats: SenderStats

    async def open(self) -> Sender[Tag_contra]: ...

    def send(self, messages: Sequence[bytes], records: Sequence[int] | None = None,
             tags: Sequence[Tag_contra] | None = None) -> None: ...

    async def close(self, timeout: float | None = None) -> None: ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def connected(self) -> bool: ...

    @property
    def local_address(self) -> str | None:
        """The source address of the session (exporterIPv4/IPv6Address), None while not connected."""
        ...


def sockname_address(name: object) -> str | None:
    if isinstance(name, tuple) and name and isinstance(name[0], str):
        return name[0].partition("%")[0]  # an IPv6 link-local address names its scope
    return None


def record_counts(messages: Sequence[bytes], records: Sequence[int] | None,
                  tags: Sequence[object] | None = None) -> Sequence[int]:
    """`records`, or 0 for each message; ValueError when records or tags do not match the messages."""
    if tags is not None and len(tags) != len(messages):
        raise ValueError(f"{len(messages)} messages but {len(tags)} tags")
    if records is None:
        return [0] * len(messages)
    if len(records) != len(messages):
        raise ValueError(f"{len(messages)} messages but {len(records)} record counts")
    return records


def describe_error(exc: BaseException | None) -> str:
    if exc is None:
        return "closed by collector"
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's own text ("Connect call failed") hides the cause
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def report_not_sent(hook: OnNotSent[Tag] | None, tags: list[Tag], endpoint: Endpoint) -> None:
    if hook is None or not tags:
        return
    try:
        hook(tags)
    except Exception as e:  # accounting must not take the sender down with it
        log.error("on_not_sent hook failed", collector=str(endpoint), error=describe_error(e))
