"""Send IPFIX messages to collectors over UDP, TCP or TLS (RFC 7011 sections 10 and 11).

Every sender has the same face (`Sender`): `await open()`, `send(messages, records)`, which never
blocks, `await close()`, which flushes with a bounded wait, `stats`, `queue_depth`, `connected`.
`records[i]` is the number of data records in `messages[i]`; the sender cannot see it in the bytes
without the templates, and needs it to count the flows it failed to deliver (notSentFlowTotalCount
is `stats.records_failed + stats.records_dropped`). Left out, every message counts as 0 records.
For the packets and octets those flows held, an `on_not_sent(messages)` hook receives every
message that was dropped or failed, once, to be decoded by the caller (Encoder.flow_totals).

The package follows the senders' parts: endpoint.py the collector address grammar and default
ports; sender.py the `Sender` face and its counters; udp.py the UDP sender; stream.py the TCP
sender (queue, reconnects, backoff); tls.py TLS on top of it. `make_sender` picks by scheme.
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
    parse_endpoint,
    split_host_port,
)
from exporter.transport.sender import OnConnect, OnNotSent, Sender, SenderStats
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
    "make_sender",
    "make_tls_context",
    "parse_endpoint",
    "send_datagrams",
    "split_host_port",
]


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
