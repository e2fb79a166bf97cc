"""Send IPFIX messages to collectors over UDP, TCP or TLS (RFC 7011 sections 10 and 11).

Every sender has the same face (`Sender`): `await open()`, `send(messages, records, tags)`, which
never blocks, `await close()`, which flushes with a bounded wait, `stats`, `queue_depth`,
`connected`. `records[i]` is the number of data records in `messages[i]`; the sender cannot see it
in the bytes without the templates, and needs it to count the flows it failed to deliver
(notSentFlowTotalCount is `stats.records_failed + stats.records_dropped`) and to drop
options-only messages before flows from a full queue. Left out, every message counts as 0 records.

The sender moves bytes and reports plain events; it never reads what a message means. `tags[i]`
is whatever the caller attaches to `messages[i]` (the service: the message's flow totals, from the
encoder); each message that is dropped, fails, or is left over at close is reported once, by its
tag, to the `on_not_sent(tags)` hook, so the caller accounts for it (notSentPacket/OctetTotalCount)
without decoding it again. Messages without a tag (the templates a sender writes on its own) are
counted, not reported. A stream sender keeps the `tags` sequence while any of its messages is
queued and reads a tag only for a message it reports, so a lazy sequence stays lazy.

The package follows the senders' parts: endpoint.py collector endpoints and their default ports
(read with the one address grammar, exporter/address.py); sender.py the `Sender` face and its
counters; udp.py the UDP sender; stream.py the TCP sender (queue, reconnects, backoff); tls.py TLS
on top of it. `make_sender` picks by scheme.
"""

from __future__ import annotations

from exporter.transport.endpoint import (
    DEFAULT_PORT,
    DEFAULT_PORTS,
    DEFAULT_TLS_PORT,
    SCHEMES,
    Endpoint,
    EndpointError,
    TransportSettingsError,
    endpoint_address,
    parse_endpoint,
)
from exporter.transport.sender import OnConnect, OnNotSent, Sender, SenderStats, Tag
from exporter.transport.stream import WRITE_BATCH, StreamOptions, TcpSender, backoff_delay
from exporter.transport.tls import TlsOptions, TlsSender, make_tls_context
from exporter.transport.udp import UdpSender, send_datagrams

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_PORTS",
    "DEFAULT_TLS_PORT",
    "SCHEMES",
    "WRITE_BATCH",
    "Endpoint",
    "EndpointError",
    "OnConnect",
    "OnNotSent",
    "Sender",
    "SenderStats",
    "StreamOptions",
    "TcpSender",
    "TlsOptions",
    "TlsSender",
    "TransportSettingsError",
    "UdpSender",
    "backoff_delay",
    "endpoint_address",
    "make_sender",
    "make_tls_context",
    "parse_endpoint",
    "send_datagrams",
]


def make_sender(endpoint: Endpoint, *, on_connect: OnConnect | None = None,
                on_not_sent: OnNotSent[Tag] | None = None, options: StreamOptions | None = None,
                tls: TlsOptions | None = None) -> Sender[Tag]:
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
